"""Reliability: exact resume, crash-safe checkpoints (kill -9, corrupt files), non-finite guard, config changes."""

import json
import os
import signal
import subprocess
import sys
import time


from tests.conftest import ROOT, read_jsonl, run_cli, train_cmd


def _weights(out):
    return (out / "checkpoints" / "latest" / "trainable.safetensors").read_bytes()


def test_resume_is_bit_identical_to_a_straight_run(tmp_path, tiny_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(train_cmd(a, 8, ["eval.at_end=false"]))
    run_cli(train_cmd(b, 4, ["eval.at_end=false"]))
    proc = run_cli(train_cmd(b, 8, ["eval.at_end=false"]))
    assert "resumed from" in proc.stdout
    assert _weights(a) == _weights(b)
    la = [r["loss"] for r in read_jsonl(a / "metrics.jsonl")]
    lb = [r["loss"] for r in read_jsonl(b / "metrics.jsonl")]
    assert la == lb and len(la) == 8


def test_changed_config_is_refused_with_a_diff(tmp_path, tiny_dir):
    out = tmp_path / "r"
    run_cli(train_cmd(out, 2, ["eval.at_end=false"]))
    before = (out / "metrics.jsonl").read_text()
    proc = run_cli(train_cmd(out, 4, ["eval.at_end=false", "losses.kd_weight=0.1"]), check=False)
    assert proc.returncode == 2
    assert "losses.kd_weight: 0.5 -> 0.1" in proc.stderr and "--allow_config_change" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before
    proc = run_cli(train_cmd(out, 4, ["eval.at_end=false", "losses.kd_weight=0.1"]) + ["--allow_config_change"])
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_dir):
    out = tmp_path / "r"
    run_cli(train_cmd(out, 4, ["eval.at_end=false"]))
    newest = out / "checkpoints" / "step_4" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated file
    proc = run_cli(train_cmd(out, 4, ["eval.at_end=false"]))
    assert "skipping checkpoint" in proc.stdout and "step_4" in proc.stdout and "trainable.safetensors" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_eval_refuses_a_corrupt_checkpoint(tmp_path, tiny_dir):
    out = tmp_path / "r"
    run_cli(train_cmd(out, 2, ["eval.at_end=false"]))
    state = out / "checkpoints" / "step_2" / "trainer_state.json"
    state.write_text(state.read_text().replace("2", "3"))
    proc = run_cli(["launch/eval.py", "--checkpoint", str(out / "checkpoints" / "latest"), "--output_dir",
                    str(tmp_path / "e")], check=False)
    assert proc.returncode != 0 and "trainer_state.json does not match its sha256" in proc.stderr


def test_kill_9_then_rerun_loses_and_repeats_nothing(tmp_path, tiny_dir):
    out = tmp_path / "k"
    cmd = [sys.executable] + train_cmd(out, 10, ["eval.at_end=false", "train.save_every=3"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once a checkpoint exists and training has gone past it
        rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        if len(rows) >= 4:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_rows = len(read_jsonl(out / "metrics.jsonl"))
    assert killed_rows >= 4
    run_cli(train_cmd(out, 10, ["eval.at_end=false", "train.save_every=3"]))
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 11))
    assert (out / "checkpoints" / "latest").resolve().name == "step_10"
    assert not list((out / "checkpoints").glob(".tmp_*"))


def test_non_finite_steps_are_skipped_and_weights_stay_finite(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    out = tmp_path / "n"
    run_cli(train_cmd(out, 4, ["eval.at_end=false"]), env={"LATENTWIRE_INJECT_NAN_AT_STEP": "2,3"})
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, True, False]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2]
    assert rows[1]["loss"] is None and rows[3]["loss"] is not None
    assert rows[1]["lr"] == rows[0]["lr"] == rows[2]["lr"]  # the schedule holds on skipped steps
    state = load_file(str(out / "checkpoints" / "latest" / "trainable.safetensors"))
    assert all(t.isfinite().all() for t in state.values())


def test_too_many_bad_steps_stop_with_a_checkpoint(tmp_path, tiny_dir):
    out = tmp_path / "s"
    proc = run_cli(train_cmd(out, 8, ["eval.at_end=false", "train.max_consecutive_bad_steps=2"]),
                   env={"LATENTWIRE_INJECT_NAN_AT_STEP": "2,3,4"}, check=False)
    assert proc.returncode != 0
    assert "2 consecutive optimizer steps (up to step 3)" in proc.stderr
    assert (out / "checkpoints" / "latest").resolve().name == "step_3"
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["skipped"] is False


class NotAllowed:  # any class outside the allowlist: unpickling it would run arbitrary code paths
    pass


def test_deepspeed_state_files_load_with_weights_only(tmp_path, tiny_dir):
    """A checkpoint file that unpickles anything but tensors and DeepSpeed's three state types is refused, even with
    a manifest that matches it."""
    import hashlib

    import torch

    out = tmp_path / "w"
    run_cli(train_cmd(out, 2, ["eval.at_end=false"]))
    ckpt = out / "checkpoints" / "step_2"
    states = ckpt / "ds" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": NotAllowed()}, states)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["ds/mp_rank_00_model_states.pt"] = hashlib.sha256(states.read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli(train_cmd(out, 4, ["eval.at_end=false"]), check=False)
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr or "Unsupported global" in proc.stderr
