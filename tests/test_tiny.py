"""Tests for latentwire.tiny: the tiny Llama/Qwen2 checkpoints load and behave like the real families.

Run: pytest tests/test_tiny.py
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from latentwire import tiny

NAMES = ("tiny-llama", "tiny-qwen2")
UNICODE_SAMPLES = (
    "Zürich — 東京",
    "naïve café, Ελληνικά, русский, עברית, 😀👍🏽",
    "  leading spaces, tabs\tand\nnewlines\r\n",
    "Super Bowl 50 was played on February 7, 2016.",
)
OFFICIAL_DEV = Path("/work/shared/data/squad/dev-v1.1.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny.build_tiny_receivers(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(built):
    return {
        name: (AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval())
        for name, path in built.items()
    }


@pytest.fixture(scope="module")
def teachers(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    return {name: tiny.build_tiny_teacher(path, out / name, seed=1) for name, path in built.items()}


def test_bundled_sample_is_official_squad_layout():
    squad = json.loads(tiny.SQUAD_SAMPLE.read_text(encoding="utf-8"))
    assert squad["version"] == "1.1"
    assert [a["title"] for a in squad["data"]][:1] == ["Super_Bowl_50"] and len(squad["data"]) == 6
    n_questions = 0
    for article in squad["data"]:
        assert set(article) == {"title", "paragraphs"} and 1 <= len(article["paragraphs"]) <= 12
        for paragraph in article["paragraphs"]:
            assert set(paragraph) == {"context", "qas"}
            for qa in paragraph["qas"]:
                assert set(qa) == {"id", "question", "answers"}
                n_questions += 1
                for answer in qa["answers"]:
                    start = answer["answer_start"]
                    assert paragraph["context"][start : start + len(answer["text"])] == answer["text"]
    assert n_questions > 300
    assert tiny.SQUAD_SAMPLE.stat().st_size < 300_000


@pytest.mark.skipif(not OFFICIAL_DEV.is_file(), reason="official SQuAD v1.1 dev file not present")
def test_bundled_sample_regenerates_byte_for_byte(tmp_path):
    tiny.make_squad_sample(OFFICIAL_DEV, tmp_path / "sample.json")
    assert (tmp_path / "sample.json").read_bytes() == tiny.SQUAD_SAMPLE.read_bytes()


def test_real_architectures_load_through_auto_classes(built, loaded):
    expected = {"tiny-llama": ("llama", "LlamaForCausalLM"), "tiny-qwen2": ("qwen2", "Qwen2ForCausalLM")}
    for name, (tok, model) in loaded.items():
        model_type, model_class = expected[name]
        assert AutoConfig.from_pretrained(built[name]).model_type == model_type
        assert type(model).__name__ == model_class
        config = model.config
        assert config.num_key_value_heads < config.num_attention_heads  # GQA, as in the 8B/7B models
        assert config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
        assert model.lm_head.weight.shape == (len(tok), config.hidden_size)
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert (Path(built[name]) / "model.safetensors").is_file()
    assert loaded["tiny-llama"][1].config.rope_parameters["rope_theta"] == 500000.0
    assert loaded["tiny-qwen2"][1].config.rope_parameters["rope_theta"] == 1e6
    assert loaded["tiny-qwen2"][1].model.layers[0].self_attn.q_proj.bias is not None
    assert len(loaded["tiny-llama"][0]) != len(loaded["tiny-qwen2"][0])


def test_special_tokens_follow_each_family(loaded):
    llama_tok, llama = loaded["tiny-llama"]
    assert type(llama_tok).__name__ == "TokenizersBackend"  # what PreTrainedTokenizerFast is in transformers 5
    assert llama_tok.bos_token == "<|begin_of_text|>" and llama_tok.eos_token == "<|end_of_text|>"
    assert llama_tok.pad_token == "<|finetune_right_pad_id|>" and llama_tok.pad_token_id != llama_tok.eos_token_id
    assert llama_tok("x")["input_ids"][0] == llama_tok.bos_token_id
    assert llama_tok("x", add_special_tokens=False)["input_ids"][0] != llama_tok.bos_token_id
    assert llama_tok.convert_tokens_to_ids("<|eot_id|>") in llama_tok("a<|eot_id|>")["input_ids"]
    assert (llama.config.bos_token_id, llama.config.eos_token_id, llama.config.pad_token_id) == (
        llama_tok.bos_token_id, llama_tok.eos_token_id, llama_tok.pad_token_id)

    qwen_tok, qwen = loaded["tiny-qwen2"]
    assert type(qwen_tok).__name__ == "Qwen2Tokenizer"
    assert qwen_tok.bos_token is None and qwen_tok.bos_token_id is None
    assert qwen_tok.eos_token == qwen_tok.pad_token == "<|endoftext|>"
    assert qwen_tok("x")["input_ids"] == qwen_tok("x", add_special_tokens=False)["input_ids"]
    assert qwen_tok("<|im_start|>hi<|im_end|>")["input_ids"][0] == qwen_tok.convert_tokens_to_ids("<|im_start|>")
    assert qwen.config.eos_token_id == qwen.config.pad_token_id == qwen_tok.eos_token_id

    for tok, _ in loaded.values():
        # Like the real vocabularies, special tokens come after every learned token.
        special_ids = tok.convert_tokens_to_ids(tok.all_special_tokens)
        assert min(special_ids) == len(tok) - len(set(special_ids))


def test_any_unicode_text_round_trips(loaded):
    for tok, _ in loaded.values():
        for text in UNICODE_SAMPLES:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_reloaded_tokenizer_encodes_like_the_trained_one(loaded):
    # transformers 5 rebuilds a qwen2 tokenizer through Qwen2Tokenizer on load; it must not change any encoding.
    texts = tiny.bundled_texts()[:300] + list(UNICODE_SAMPLES)
    for name, style, size in (("tiny-llama", tiny.LLAMA_STYLE, 1000), ("tiny-qwen2", tiny.QWEN2_STYLE, 1300)):
        trained = tiny.train_byte_bpe(tiny.bundled_texts(), size, style)
        reloaded = loaded[name][0]
        assert trained.get_vocab() == reloaded.get_vocab()
        assert trained(texts)["input_ids"] == reloaded(texts)["input_ids"]


def test_inputs_embeds_forward_matches_input_ids_forward(loaded):
    for tok, model in loaded.values():
        batch = tok(["Which NFL team won Super Bowl 50?", "Zürich — 東京"], return_tensors="pt", padding=True)
        with torch.no_grad():
            by_ids = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            embeds = model.get_input_embeddings()(batch["input_ids"])
            by_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        assert by_ids.shape == (*batch["input_ids"].shape, len(tok))
        torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-6)


def test_rebuild_is_deterministic_and_seeded(built, tmp_path):
    again = tiny.build_tiny_receivers(tmp_path / "same")
    other_seed = tiny.build_tiny_receivers(tmp_path / "seed1", seed=1)
    for name in NAMES:
        tokenizer_json = (built[name] / "tokenizer.json").read_bytes()
        assert (again[name] / "tokenizer.json").read_bytes() == tokenizer_json
        assert (other_seed[name] / "tokenizer.json").read_bytes() == tokenizer_json  # the seed is for weights only
        weights = load_file(built[name] / "model.safetensors")
        same = load_file(again[name] / "model.safetensors")
        different = load_file(other_seed[name] / "model.safetensors")
        assert weights.keys() == same.keys() == different.keys()
        assert all(torch.equal(weights[k], same[k]) for k in weights)
        assert not torch.equal(weights["model.embed_tokens.weight"], different["model.embed_tokens.weight"])


def test_teacher_shares_the_receiver_tokenizer_exactly(built, loaded, teachers):
    for name in NAMES:
        receiver_dir, teacher_dir = built[name], teachers[name]
        for file in ("tokenizer.json", "tokenizer_config.json"):
            assert (teacher_dir / file).read_bytes() == (receiver_dir / file).read_bytes()
        receiver_tok, receiver = loaded[name]
        teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        assert teacher_tok.get_vocab() == receiver_tok.get_vocab()
        assert teacher_tok.all_special_tokens == receiver_tok.all_special_tokens
        assert teacher_tok(list(UNICODE_SAMPLES))["input_ids"] == receiver_tok(list(UNICODE_SAMPLES))["input_ids"]
        assert teacher.config.model_type == receiver.config.model_type
        assert teacher.config.vocab_size == receiver.config.vocab_size
        assert teacher.config.eos_token_id == receiver.config.eos_token_id
        assert teacher.config.hidden_size == 2 * receiver.config.hidden_size
        assert teacher.config.num_hidden_layers == receiver.config.num_hidden_layers + 1
        assert teacher.num_parameters() > 2 * receiver.num_parameters()


def test_complete_builds_are_skipped_and_incomplete_ones_rebuilt(tmp_path, monkeypatch):
    paths = tiny.build_tiny_receivers(tmp_path)
    calls = []
    real = tiny.build_tiny_model
    counted = lambda model_type, *args, **kwargs: calls.append(model_type) or real(model_type, *args, **kwargs)
    monkeypatch.setattr(tiny, "build_tiny_model", counted)

    assert tiny.build_tiny_receivers(tmp_path) == paths and calls == []

    (paths["tiny-qwen2"] / tiny.STAMP_NAME).unlink()  # what an interrupted build leaves
    (paths["tiny-qwen2"] / "model.safetensors").write_bytes(b"truncated")
    tiny.build_tiny_receivers(tmp_path)
    assert calls == ["qwen2"]
    assert (paths["tiny-qwen2"] / tiny.STAMP_NAME).is_file()
    AutoModelForCausalLM.from_pretrained(paths["tiny-qwen2"])

    stamp = json.loads((paths["tiny-llama"] / tiny.STAMP_NAME).read_text())
    stamp["spec_hash"] = "stale"
    (paths["tiny-llama"] / tiny.STAMP_NAME).write_text(json.dumps(stamp))
    tiny.build_tiny_receivers(tmp_path)
    assert calls == ["qwen2", "llama"]

    rng_state = torch.random.get_rng_state()
    tiny.build_tiny_receivers(tmp_path, overwrite=True)
    assert calls[2:] == ["llama", "qwen2"]
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # seeding the build leaves the caller's RNG alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)  # no partial directories left behind


def test_refuses_to_replace_a_directory_that_is_not_a_build(built, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_teacher(built["tiny-llama"], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_prints_the_paths(built, capsys):
    tiny.main(["--out", str(built["tiny-llama"].parent)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{name}\t{built[name]}" for name in NAMES]
