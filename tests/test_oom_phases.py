"""An out-of-memory error on ONE rank, in each phase of a step, under ZeRO-2 and ZeRO-3, through the real launchers
on 2 CPU ranks: the job never hangs, and the run ends with the same logged steps and losses as a run without the
fault.

    LATENTWIRE_INJECT_OOM_AT_STEP=4 LATENTWIRE_INJECT_OOM_RANK=1 LATENTWIRE_INJECT_OOM_PHASE=forward|backward|step

- ZeRO-2 forward: the forward holds no collective, so both ranks agree on the fault and back off in process
  (micro-batch 2 -> 1, accumulation 1 -> 2) from step 4 on.
- Everywhere else (a ZeRO-3 forward gathers parameters; backward and optimizer step reduce gradients) rank 1 leaves
  at once with exit 75, its peer's collective fails and it leaves with 75 too (or the launcher ends it), and
  launch/supervise.py relaunches from checkpoints/step_2 with the halved micro-batch: step 3 is replayed.

No case may hang: the faulted launch must have ended (the supervisor logs its restart) within 30 s of the fault
and the whole job within a minute of it (gloo's own timeout, the old failure mode, is 600 s). The losses
are compared with one fault-free run per ZeRO stage: the same global batch reads the same examples whatever the
micro-batch layout. Run: `python -m pytest tests/test_oom_phases.py -m slow -q` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, deepspeed_cmd, read_jsonl, small_overrides

STEPS, OOM_STEP, CHECKPOINT = 4, 4, 2  # save_every=2 (small_overrides): the last checkpoint before the fault
FAULT_TO_RESTART_S = 30.0  # the faulted launch is gone: nothing waits in a collective
FAULT_TO_END_S = 60.0  # relaunch, resume from the checkpoint, replay, finish
DS_CONFIGS = {2: "ds_configs/zero2.json", 3: "ds_configs/zero3.json"}


# ---------------------------------------------------------------------------------------------------------------
# The pieces, in one process
# ---------------------------------------------------------------------------------------------------------------


def test_injection_fires_once_in_the_named_phase(monkeypatch):
    import torch

    from latentwire.faults import FaultInjection

    monkeypatch.setenv("LATENTWIRE_INJECT_OOM_AT_STEP", "3")
    monkeypatch.setenv("LATENTWIRE_INJECT_OOM_PHASE", "step")
    injection = FaultInjection.from_env({}, rank=0)
    injection.fire("forward", 2)  # another phase: nothing
    injection.fire("step", 1)  # another step: nothing
    with pytest.raises(torch.OutOfMemoryError, match="step of optimizer step 3"):
        injection.fire("step", 2)
    injection.fire("step", 2)  # once
    assert injection.oom_fired == 3
    assert FaultInjection.from_env({"oom_injected_steps": [3]}, rank=0).oom_at is None  # fired before a relaunch
    monkeypatch.setenv("LATENTWIRE_INJECT_OOM_RANK", "1")
    assert FaultInjection.from_env({}, rank=0).oom_at is None and FaultInjection.from_env({}, rank=1).oom_at == 3
    monkeypatch.setenv("LATENTWIRE_INJECT_OOM_PHASE", "optimizer")
    with pytest.raises(ValueError, match="forward, backward, step"):
        FaultInjection.from_env({}, rank=0)


def test_backward_injection_raises_inside_autograd(monkeypatch):
    import torch

    from latentwire.faults import FaultInjection

    monkeypatch.setenv("LATENTWIRE_INJECT_OOM_AT_STEP", "1")
    monkeypatch.setenv("LATENTWIRE_INJECT_OOM_PHASE", "backward")
    injection = FaultInjection.from_env({}, rank=0)
    x = torch.ones(3, requires_grad=True)
    loss = injection.arm_backward((x * 2).sum(), step=0)
    assert float(loss.detach()) == 6.0 and injection.oom_fired is None  # the forward is untouched
    with pytest.raises(torch.OutOfMemoryError, match="backward of optimizer step 1"):
        loss.backward()
    assert injection.oom_fired == 1
    again = injection.arm_backward((x * 2).sum(), step=0)
    again.backward()  # fired once only
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_leaving_alone_persists_the_layout_and_tells_the_peers(tmp_path):
    import time as time_module

    from latentwire.faults import OOM_RESTART_EXIT_CODE, leave_for_relaunch, peer_requested_relaunch, read_run_state

    before = time_module.time()
    relaunch = leave_for_relaunch(tmp_path, 1, 1, 2, 1, 4, "step 4, micro-batch 1/1, backward")
    assert relaunch.code == OOM_RESTART_EXIT_CODE
    state = read_run_state(tmp_path)
    assert (state["micro_batch"], state["grad_accum"], state["oom_events"]) == (1, 2, 1)
    assert state["oom_injected_steps"] == [4]
    assert peer_requested_relaunch(tmp_path, since=before)
    assert not peer_requested_relaunch(tmp_path, since=time_module.time() + 1)  # a request from an earlier process
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# Two ranks through the launchers
# ---------------------------------------------------------------------------------------------------------------


def _train_cmd(out, zero: int) -> list[str]:
    cmd = deepspeed_cmd(2) + ["launch/train.py", "--deepspeed", DS_CONFIGS[zero], "--config", "configs/tiny.json",
                              "--output_dir", str(out)]
    for s in small_overrides(STEPS, ["eval.at_end=false"]):
        cmd += ["--set", s]
    return cmd


def _run(cmd: list[str], env: dict | None = None, timeout: float = 900) -> tuple[int, str, str, float, dict]:
    """Run a repository command; returns (exit code, stdout, stderr, the time.time() it ended, {stderr line:
    time.time() it arrived})."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    args = [sys.executable, *cmd] if cmd[0].endswith(".py") else cmd
    proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = {"out": [], "err": []}
    arrived: dict[str, float] = {}

    def read(stream, key):
        for line in stream:
            chunks[key].append(line)
            arrived.setdefault(line.strip(), time.time())

    readers = [threading.Thread(target=read, args=(stream, key)) for key, stream in
               (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the supervisor forwards SIGTERM to its launcher's process group
        proc.wait(timeout=30)
        raise
    ended = time.time()
    for reader in readers:
        reader.join()
    return code, "".join(chunks["out"]), "".join(chunks["err"]), ended, arrived


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """Fault-free metrics rows per ZeRO stage, each run once and only when a test asks for it."""
    rows: dict[int, list[dict]] = {}

    def get(zero: int) -> list[dict]:
        if zero not in rows:
            out = tmp_path_factory.mktemp(f"reference_z{zero}")
            code, stdout, stderr, _, _ = _run(_train_cmd(out, zero))
            assert code == 0, stderr[-4000:]
            rows[zero] = read_jsonl(out / "metrics.jsonl")
        return rows[zero]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("phase", ["forward", "backward", "step"])
def test_oom_on_one_rank_never_hangs(phase, zero, tmp_path, tiny_dir, reference):
    out = tmp_path / "run"
    env = {"LATENTWIRE_INJECT_OOM_AT_STEP": str(OOM_STEP), "LATENTWIRE_INJECT_OOM_RANK": "1",
           "LATENTWIRE_INJECT_OOM_PHASE": phase}
    cmd = ["launch/supervise.py", "--max_restarts", "2", "--"] + _train_cmd(out, zero)
    started = time.time()
    code, stdout, stderr, ended, arrived = _run(cmd, env)
    assert code == 0, f"exit {code}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    state = json.loads((out / "run_state.json").read_text())
    in_process = zero == 2 and phase == "forward"
    if in_process:
        assert "restart 1/2" not in stderr and "micro-batch 2 -> 1" in stdout
        fault_at = (out / "run_state.json").stat().st_mtime  # written by the back-off, right after the fault
        restarted = fault_at
        first_new = OOM_STEP
    else:
        assert "restart 1/2" in stderr and f"rank 1: out of memory at step {OOM_STEP}" in stderr
        assert "restart 2/2" not in stderr
        fault_at = state["relaunch_requested_at"]
        restarted = min(t for line, t in arrived.items() if "restart 1/2" in line)
        first_new = CHECKPOINT + 1  # replayed from the checkpoint
    assert (state["micro_batch"], state["grad_accum"], state["oom_events"]) == (1, 2, 1)
    assert state["oom_injected_steps"] == [OOM_STEP]

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {r["global_batch"] for r in rows} == {4}
    for r in rows:
        expected = (2, 1, 0) if r["step"] < first_new else (1, 2, 1)
        assert (r["micro_batch"], r["grad_accum"], r["oom_events"]) == expected, r
    for r, ref in zip(rows, reference(zero)):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-5), (r, ref)
        assert r["ce/llama"] == pytest.approx(ref["ce/llama"], abs=1e-5)
    assert (out / "checkpoints" / "latest").resolve().name == f"step_{STEPS}"

    print(f"\nZeRO-{zero} {phase}: fault at +{fault_at - started:.1f} s, "
          f"{'relaunch' if not in_process else 'back-off'} {restarted - fault_at:.1f} s after it, job ended "
          f"{ended - fault_at:.1f} s after it (+{ended - started:.1f} s in all)")
    assert started < fault_at <= restarted < ended
    assert restarted - fault_at < FAULT_TO_RESTART_S, f"the faulted launch ended {restarted - fault_at:.0f} s late"
    assert ended - fault_at < FAULT_TO_END_S, f"the job ended {ended - fault_at:.0f} s after the fault"
