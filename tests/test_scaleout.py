"""Scale-out behaviour through the real launchers on CPU ranks: OOM back-off (in process under ZeRO-2, by the
supervisor under ZeRO-3), the micro-batch-1 error, and rank-layout invariance of the losses."""

import json

import pytest

from tests.conftest import deepspeed_cmd, read_jsonl, run_cli, small_overrides

pytestmark = pytest.mark.slow


def _ds_cmd(out, ds_config, steps, extra=()):
    cmd = deepspeed_cmd(2) + ["launch/train.py", "--deepspeed", ds_config, "--config", "configs/tiny.json",
                              "--output_dir", str(out)]
    for s in small_overrides(steps, ["eval.at_end=false", *extra]):
        cmd += ["--set", s]
    return cmd


def _assert_backed_off(out, oom_step, steps):
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {r["global_batch"] for r in rows} == {4}
    for r in rows:
        before = r["step"] < oom_step
        assert (r["micro_batch"], r["grad_accum"], r["oom_events"]) == ((2, 1, 0) if before else (1, 2, 1)), r
    state = json.loads((out / "run_state.json").read_text())
    assert state["micro_batch"] == 1 and state["grad_accum"] == 2 and state["oom_events"] == 1


def test_injected_oom_under_zero2_is_recovered_in_process(tmp_path, tiny_dir):
    out = tmp_path / "z2"
    proc = run_cli(_ds_cmd(out, "ds_configs/zero2.json", 5), env={"LATENTWIRE_INJECT_OOM_AT_STEP": "3"}, timeout=900)
    assert "micro-batch 2 -> 1" in proc.stdout + proc.stderr
    assert "relaunch" not in proc.stdout
    _assert_backed_off(out, 3, 5)


def test_injected_oom_under_zero3_is_recovered_by_the_supervisor(tmp_path, tiny_dir):
    out = tmp_path / "z3"
    cmd = ["launch/supervise.py", "--max_restarts", "2", "--"] + _ds_cmd(out, "ds_configs/zero3.json", 5)
    proc = run_cli(cmd, env={"LATENTWIRE_INJECT_OOM_AT_STEP": "3"}, timeout=1200)
    assert "restart 1/2" in proc.stderr
    _assert_backed_off(out, 3, 5)
    assert (out / "checkpoints" / "latest").resolve().name == "step_5"


def test_oom_at_micro_batch_one_stops_with_a_clear_error(tmp_path, tiny_dir):
    cmd = ["launch/train.py", "--config", "configs/tiny.json", "--output_dir", str(tmp_path / "m1")]
    for s in small_overrides(3, ["train.micro_batch=1", "eval.at_end=false"]):
        cmd += ["--set", s]
    proc = run_cli(cmd, env={"LATENTWIRE_INJECT_OOM_AT_STEP": "2"}, check=False)
    assert proc.returncode != 0
    assert "micro-batch 1: nothing left to halve" in proc.stderr


def test_one_rank_micro4_equals_two_ranks_micro2(tmp_path, tiny_dir):
    """Same global batch, different layout: identical data and token-normalized losses, the extra first-token CE
    term (normalised over the global batch like every other term) included."""
    first_tok = ["curriculum.first_tok_weight_start=1.0", "curriculum.first_tok_weight_end=1.0"]
    single = tmp_path / "one"
    cmd = ["launch/train.py", "--config", "configs/tiny.json", "--output_dir", str(single)]
    for s in small_overrides(3, ["eval.at_end=false", "train.micro_batch=4", *first_tok]):
        cmd += ["--set", s]
    run_cli(cmd)
    double = tmp_path / "two"
    run_cli(_ds_cmd(double, "ds_configs/zero2.json", 3, first_tok), timeout=900)
    a, b = read_jsonl(single / "metrics.jsonl"), read_jsonl(double / "metrics.jsonl")
    assert [r["global_batch"] for r in a] == [r["global_batch"] for r in b] == [4, 4, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5), (ra, rb)
        for key in ("ce/llama", "ce/qwen", "kd/llama", "kd/qwen"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), key
