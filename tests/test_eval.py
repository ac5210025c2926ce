"""Evaluation: every path on the same examples, embedding replay == text, no gold leakage into predictions,
real wire bytes within their bound, per-dataset breakdowns, periodic eval + best checkpoint, launch/eval.py."""

import json
from dataclasses import replace
import os
import subprocess
import sys

import pytest
import torch

from latentwire import checkpoint as CK
from latentwire import config as C
from latentwire import data as D
from latentwire import eval as E
from latentwire import wire
from latentwire.model import LatentWire
from tests.conftest import ROOT, run_cli
from tests.helpers import EVAL_OVERRIDES, eval_examples, make_checkpoint

ALL_PATHS = ["text", "latent", "latent_fp16", "latent_int4", "token_budget", "byte_budget", "byte_budget_fp16",
             "byte_budget_int4", "closed_book", "embed_raw", "embed_anchor", "embed_resampled"]
TEXT_SIDE = ["text", "token_budget", "byte_budget", "byte_budget_fp16", "byte_budget_int4", "closed_book"]


@pytest.fixture(scope="module")
def model(tiny_receivers):
    cfg = C.load_config(ROOT / "configs" / "tiny.json", EVAL_OVERRIDES)
    torch.manual_seed(0)
    return LatentWire(cfg, tiny_receivers)


@pytest.fixture(scope="module")
def evaluated(model):
    return E.evaluate(model, eval_examples(), features=[])


def test_every_path_and_contract_key_on_the_same_examples(evaluated, model):
    result, rows = evaluated
    assert result["paths"] == ALL_PATHS
    assert result["receivers"] == ["llama", "qwen"] and result["n_examples"] == 3
    for name in ("llama", "qwen"):
        for path in ALL_PATHS:
            entry = result[name][path]
            for key in ("em", "f1", "nll", "first_tok_top1", "first_tok_top5", "bytes"):
                assert isinstance(entry[key], float), (name, path, key)
            assert entry["n"] == 3
            lat = result["latency"][name][path]
            assert lat["prefill_ms"]["median"] > 0 and lat["decode_ms_per_token"]["p90"] > 0
    assert [r["id"] for r in rows] == [ex.id for ex in eval_examples()]
    for row in rows:
        assert row["answers"] and set(row["predictions"]) == {"llama", "qwen"}
        assert all(set(p) == set(ALL_PATHS) for p in row["predictions"].values())
        # What every text-side path read is on record, per receiver.
        assert set(row["inputs"]) == {"llama", "qwen"}
        assert all(set(p) == set(TEXT_SIDE) for p in row["inputs"].values())
    assert result["features"] == [] and result["wire_precision"] == "int8" and result["split"] == "test"


def test_embedding_replay_reproduces_text(evaluated):
    """Raw replay feeds the receiver's own embeddings of the text sequence: anything but equality is a bug in
    the inputs_embeds path, not in the latent."""
    result, rows = evaluated
    for name in result["receivers"]:
        assert [r["predictions"][name]["embed_raw"] for r in rows] == [r["predictions"][name]["text"] for r in rows]
        for key in ("em", "f1", "first_tok_top1", "first_tok_top5"):
            assert result[name]["embed_raw"][key] == result[name]["text"][key]
        assert result[name]["embed_raw"]["nll"] == pytest.approx(result[name]["text"]["nll"], abs=1e-5)


def test_wire_section_reports_real_payload_bytes_within_bound(evaluated, model):
    result, _ = evaluated
    w = result["wire"]
    enc = model.cfg.encoder
    assert w["latent_slots"] == enc.m_shared + 2 * enc.m_private == model.encoder.n_slots
    assert w["latent_dim"] == enc.d_z and w["group_size"] == 64
    sizes = w["latent_bytes"]
    assert sizes["fp16"] > sizes["int8"] > sizes["int4"]
    bits = {"fp16": 16, "int8": 8, "int4": 4}
    for precision, nbytes in sizes.items():
        ideal = w["latent_slots"] * w["latent_dim"] * bits[precision] / 8
        assert nbytes == wire.payload_nbytes_bound(w["latent_slots"], w["latent_dim"], precision, 64)
        assert ideal < nbytes <= 1.10 * ideal + 64, (precision, nbytes, ideal)
    prompts = [D.prompt_text(ex, 256) for ex in eval_examples()]
    assert w["text_bytes_utf8"] == pytest.approx(sum(len(p.encode()) for p in prompts) / 3)
    assert w["text_bytes_zstd"] < w["text_bytes_utf8"]
    for name, receiver in model.receivers.items():
        tokens = sum(len(receiver.contract.encode(p)) for p in prompts) / 3
        assert w["token_compression"][name] == pytest.approx(tokens / (enc.m_shared + enc.m_private))
    for name in result["receivers"]:  # each latent path sends its own precision's payload
        assert result[name]["latent"]["bytes"] == sizes["int8"]
        assert result[name]["latent_int4"]["bytes"] == sizes["int4"]
        for precision, path in (("int8", "byte_budget"), ("fp16", "byte_budget_fp16"), ("int4", "byte_budget_int4")):
            entry = result[name][path]  # within the payload's bytes unless a question alone overran them
            assert entry["bytes"] <= sizes[precision] or entry["budget_overruns"] > 0, (path, entry)
    # Ratios by what is sent: all slots on the wire, and real payload bytes with the header.
    for name, receiver in model.receivers.items():
        tokens = sum(len(receiver.contract.encode(p)) for p in prompts) / 3
        comp = w["compression"][name]
        assert comp["tokens_read"] == pytest.approx(tokens / (enc.m_shared + enc.m_private))
        assert comp["tokens_sent"] == pytest.approx(tokens / w["latent_slots"]) and comp["tokens_sent"] < comp["tokens_read"]
        for precision, nbytes in sizes.items():
            assert comp["bytes_utf8"][precision] == pytest.approx(w["text_bytes_utf8"] / nbytes)
            assert comp["bytes_zstd"][precision] == pytest.approx(w["text_bytes_zstd"] / nbytes)


@pytest.mark.parametrize("slots,dim", [(16, 8), (40, 256), (48, 4096), (7, 33)])
def test_default_group_keeps_every_precision_within_ten_percent(slots, dim):
    group = C.EvalConfig().group_size
    for precision, bits in (("fp16", 16), ("int8", 8), ("int4", 4)):
        ideal = slots * dim * bits / 8
        assert wire.payload_nbytes_bound(slots, dim, precision, group) <= 1.10 * ideal + 64, (precision, slots, dim)


def test_budget_baselines_keep_the_question_and_fill_the_budget_with_context(model):
    examples = eval_examples()
    z = torch.randn(3, model.encoder.n_slots, model.cfg.encoder.d_z)
    payloads = {p: wire.encode_batch(z, p, 64) for p in ("fp16", "int8", "int4")}
    lens = {p: [len(b) for b in v] for p, v in payloads.items()}
    latents = {p: wire.decode_batch(v) for p, v in payloads.items()}
    m_read = model.cfg.encoder.m_shared + model.cfg.encoder.m_private
    for name, receiver in model.receivers.items():
        c = receiver.contract
        bos = [c.bos_id] if c.text_bos else []
        for path, fits in (("token_budget", lambda t, i: len(c.encode(t)) <= m_read),
                           ("byte_budget", lambda t, i: len(t.encode()) <= lens["int8"][i]),
                           ("byte_budget_int4", lambda t, i: len(t.encode()) <= lens["int4"][i])):
            inp = E.path_inputs(model, name, path, examples, latents, lens)
            for i, (ex, text) in enumerate(zip(examples, inp["texts"])):
                context, question = D.prompt_parts(ex, 256)
                assert text.endswith(f"\nQuestion: {question}\n"), (path, text)  # the whole question, always
                kept = text[len("Context: "):-len(f"\nQuestion: {question}\n")]
                assert context.startswith(kept)  # context from its start
                if fits(text, i):  # within budget, and no longer context would fit
                    longer = D.PROMPT_TEMPLATE.format(context=context[:len(kept) + 1], question=question)
                    assert len(kept) == len(context) or not fits(longer, i), (path, i)
                else:  # the question alone overran the budget: kept whole, no context, counted
                    assert kept == "" and inp["overruns"] >= 1
                row = inp["ids"][i][inp["mask"][i].bool()].tolist()
                assert row == bos + c.encode(text) + c.anchor_ids
                assert inp["bytes"][i] == len(text.encode())
        closed = E.path_inputs(model, name, "closed_book", examples, latents, lens)
        assert closed["texts"] == [f"Question: {ex.question}\n" for ex in examples]
        inp = E.path_inputs(model, name, "embed_resampled", examples, latents, lens)
        assert inp["ids"] is None and inp["embeds"].shape[1] == m_read + len(c.latent_prefix_ids())
        rms = inp["embeds"][:, :m_read].float().pow(2).mean(dim=(1, 2)).sqrt()
        assert torch.allclose(rms, torch.full_like(rms, float(model.adapters[name].target_rms)), rtol=1e-2)


def test_fit_prompt_counts_a_question_that_overruns():
    from latentwire.baselines import byte_budget_prompt, fit_prompt

    text, over = byte_budget_prompt("a long context " * 20, "What is this really about?", 10)
    assert over and text == "Context: \nQuestion: What is this really about?\n"
    text, over = fit_prompt("Zürich Zürich Zürich", "Q?", lambda t: len(t.encode()) <= 30)
    assert not over and len(text.encode()) <= 30 and text.startswith("Context: Zü")


def test_changing_gold_answer_length_cannot_change_any_prediction(model):
    examples = eval_examples()[:2]
    short = [replace(ex, answers=["x"]) for ex in examples]
    long = [replace(ex, answers=[" ".join(["the quick brown fox jumps"] * 4)]) for ex in examples]
    _, rows_short = E.evaluate(model, short, latency=False)
    result_long, rows_long = E.evaluate(model, long, latency=False)
    assert len(rows_short) == 2 and set(result_long["paths"]) == set(ALL_PATHS)
    assert [r["predictions"] for r in rows_short] == [r["predictions"] for r in rows_long]


def test_per_dataset_breakdown(evaluated):
    result, _ = evaluated
    assert result["data"]["sources"] == {"squad": 2, "nq": 1}
    assert set(result["data"]["prompts_truncated"]) == {"squad", "nq"}
    for name in result["receivers"]:
        for path in result["paths"]:
            entry = result[name][path]
            parts = entry["by_source"]
            assert {s: p["n"] for s, p in parts.items()} == {"squad": 2, "nq": 1}
            for key in ("f1", "nll"):
                weighted = (2 * parts["squad"][key] + parts["nq"][key]) / 3
                assert entry[key] == pytest.approx(weighted)


def test_report_has_a_table_per_dataset(evaluated, tmp_path):
    from latentwire import report

    result, _ = evaluated
    rows = [{"step": s, "loss": 7.0 - s / 10, "ce/llama": 6.9, "kd/llama": 0.1, "first_tok_acc/llama": 0.0,
             "lr": 1e-3 * s, **({"eval/latent_f1_mean": 1.0 * s} if s % 2 == 0 else {})} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = report.write_report(result, tmp_path, tmp_path / "metrics.jsonl")
    assert sorted(p.name for p in written) == ["em_by_path.png", "em_vs_bytes.png", "report.md", "training_curves.png"]
    for png in written[1:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.md").read_text()
    assert "## All datasets (3 examples)" in text and "## squad (2 examples" in text and "## nq (1 examples" in text
    assert text.count("| llama | embed_resampled |") == 4  # all + two datasets + the latency table
    assert "| int4 |" in text and "prefill ms" in text
    assert E.format_table(result).splitlines()[0].startswith("| receiver | path | EM |")


def test_periodic_eval_and_best_checkpoint(model, tmp_path):
    out = E.periodic_eval(model, eval_examples(), step=7)
    assert out["step"] == 7 and out["metric"] == "latent_f1_mean"
    assert out["log"]["eval/latent_f1_mean"] == out["value"]
    assert {k.split("/")[1] for k in out["log"] if k.count("/") == 2} >= {"latent_f1", "latent_nll"}

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    assert CK.best_checkpoint(root) is None
    assert CK.update_best(root, root / "step_2", 10.0, "latent_f1_mean")
    assert not CK.update_best(root, root / "step_4", 9.0, "latent_f1_mean")  # worse: stays
    assert not CK.update_best(root, root / "step_4", float("nan"), "latent_f1_mean")
    assert os.readlink(root / "best") == "step_2" and CK.best_checkpoint(root) == (root / "step_2").resolve()
    assert CK.update_best(root, root / "step_6", 12.5, "latent_f1_mean")
    assert CK.read_best(root) == {"metric": "latent_f1_mean", "value": 12.5, "checkpoint": "step_6", "step": 6,
                                  "split": None}
    # A record measured on another validation set (a data-curriculum stage changed it) does not block a new one.
    assert CK.update_best(root, root / "step_4", 1.0, "latent_f1_mean", split="other-validation-set")
    assert not CK.update_best(root, root / "step_2", 0.5, "latent_f1_mean", split="other-validation-set")
    assert CK.update_best(root, root / "step_6", 12.5, "latent_f1_mean")
    # NLL is lower-is-better; a record of another metric does not block the first value of this one.
    assert CK.update_best(root, root / "step_8", 5.0, "latent_nll_mean")
    assert not CK.update_best(root, root / "step_6", 5.5, "latent_nll_mean")
    assert CK.update_best(root, root / "step_6", 4.0, "latent_nll_mean")
    assert os.readlink(root / "best") == "step_6" and not (root / ".best_tmp").exists()
    with pytest.raises(FileNotFoundError):
        CK.update_best(root, tmp_path / "elsewhere", 1.0, "latent_nll_mean")


def test_eval_config_fields_are_validated():
    base = ROOT / "configs" / "tiny.json"
    cfg = C.load_config(base, ["eval.every=5", "eval.best_metric=latent_int4_nll_qwen"])
    assert cfg.eval.every == 5 and cfg.eval.periodic_examples == 16
    with pytest.raises(C.ConfigError, match="eval.best_metric.*receiver name"):
        C.load_config(base, ["eval.best_metric=latent_f1_gpt"])
    with pytest.raises(C.ConfigError, match="eval.best_metric.*em, f1, nll"):
        C.load_config(base, ["eval.best_metric=latent_acc_mean"])
    with pytest.raises(C.ConfigError, match="eval.every"):
        C.load_config(base, ["eval.every=-1"])
    with pytest.raises(C.ConfigError, match="eval.group_size"):
        C.load_config(base, ["eval.group_size=70000"])


def test_launch_eval_writes_the_full_contract(tiny_receivers, tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, tiny_receivers)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 7.0, "ce/llama": 6.9, "lr": 1e-3}) + "\n")
    out = tmp_path / "eval"
    proc = run_cli(["launch/eval.py", "--checkpoint", str(run / "checkpoints" / "latest"), "--output_dir", str(out),
                    "--set", "eval.max_examples=2"])
    assert "| llama | embed_raw |" in proc.stdout and "report.md" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    for name in ("llama", "qwen"):
        for path in ("text", "latent", "token_budget", "closed_book"):
            for key in ("em", "f1", "nll"):
                assert isinstance(m[name][path][key], float)
        assert isinstance(m[name]["latent"]["first_tok_top1"], float)
        assert set(m["wire"]["compression"][name]) == {"tokens_read", "tokens_sent", "bytes_utf8", "bytes_zstd",
                                                       "bytes_zstd_dict"}  # launch/eval.py gives it the training split
    assert m["wire"]["text_bytes_zstd_dict"] < m["wire"]["text_bytes_zstd"]
    for key in ("latent_slots", "latent_dim", "latent_bytes", "text_bytes_utf8", "text_bytes_zstd",
                "token_compression", "compression"):
        assert key in m["wire"]
    assert m["split"] == "test"
    assert m["wire"]["latent_bytes"]["fp16"] > m["wire"]["latent_bytes"]["int8"] > m["wire"]["latent_bytes"]["int4"]
    assert set(m["latency"]) == {"llama", "qwen"} and m["features"] == []
    assert sorted(p.name for p in out.iterdir()) == ["em_by_path.png", "em_vs_bytes.png", "metrics.json",
                                                    "predictions.jsonl", "report.md", "training_curves.png"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(set(r) == {"id", "source", "answers", "predictions", "inputs"} for r in rows)
    val = tmp_path / "eval_val"
    run_cli(["launch/eval.py", "--checkpoint", str(run / "checkpoints" / "latest"), "--output_dir", str(val),
             "--set", "eval.max_examples=2", "--split", "validation", "--no_plots"])
    m_val = json.loads((val / "metrics.json").read_text())
    ids_val = {json.loads(line)["id"] for line in (val / "predictions.jsonl").read_text().splitlines()}
    assert m_val["split"] == "validation" and not ids_val & {r["id"] for r in rows}


@pytest.mark.parametrize("user_setting, enabled_after", [(None, "False"), ("0", "True")])
def test_dependency_progress_bars_are_off_when_stderr_is_a_file(user_setting, enabled_after):
    """transformers' "Loading weights" bars would fill slurm logs with carriage-return frames; the entry points'
    quiet_known_warnings() turns them off where stderr is not a terminal, unless the user chose otherwise."""
    code = ("from transformers.utils import logging as hf; hf.enable_progress_bar(); "
            "from latentwire.monitor import quiet_known_warnings; quiet_known_warnings(); "
            "print(hf.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    if user_setting is not None:
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = user_setting
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == enabled_after


def test_training_keeps_its_best_checkpoint(tmp_path, tiny_dir):
    from tests.conftest import read_jsonl, train_cmd

    out = tmp_path / "run"
    proc = run_cli(train_cmd(out, steps=4, extra=["eval.every=1", "eval.periodic_examples=2", "train.keep_last=1",
                                                  "eval.best_metric=latent_nll_mean", "eval.at_end=false",
                                                  "train.log_every=2"]))
    # Output to a file (not a terminal): plain progress lines every log_every steps, no redrawn bar.
    lines = [x for x in proc.stdout.splitlines() if x.startswith("step ") and " loss " in x]
    assert [x.split()[1] for x in lines] == ["2/4", "4/4"] and "\r" not in proc.stdout + proc.stderr
    # TensorBoard gets the loss, the learning rate and the periodic validation metrics.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "eval/latent_em/llama", "eval/latent_nll_mean"} <= tags, sorted(tags)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    values = [r["eval/latent_nll_mean"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(values) == 4
    root = out / "checkpoints"
    best = CK.read_best(root)
    assert best["value"] == min(values) and best["step"] == values.index(min(values)) + 1
    assert os.readlink(root / "best") == f"step_{best['step']}"
    assert (root / "best" / "trainable.safetensors").is_file()  # pruning (keep_last=1) spared it
    assert os.readlink(root / "latest") == "step_4"
