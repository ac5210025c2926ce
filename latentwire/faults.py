"""Fault handling for the trainer: OOM agreement and back-off, the non-finite step guard, SIGUSR1 requeue, fault
injection, and the run-state file that survives relaunches.

The library never exits the process. When a run must be started again it raises `Relaunch(code)`, and only the
entry point (launch/train.py) turns that into the exit code, at once and without teardown (a peer rank may be
stuck in a collective):

    OOM_RESTART_EXIT_CODE (75, sysexits' EX_TEMPFAIL)  an out-of-memory fault that cannot be absorbed in process
        (under ZeRO-3, or a second OOM); the halved micro-batch is already in RUN/run_state.json and
        launch/supervise.py reruns the same command, which resumes from checkpoints/latest.
    REQUEUE_EXIT_CODE (76)  SIGUSR1 (slurm's warning before the time limit): a checkpoint was saved on every rank;
        the sbatch scripts answer with `scontrol requeue`.

Decisions are agreed on by all ranks (`distributed.any_rank`) wherever the ranks can meet in a collective. An
out-of-memory error is agreed on only where no collective can be pending: the forward under ZeRO <= 2
(`forward_agreed`, then the trainer backs off in process). A ZeRO-3 forward gathers parameters, and every backward
and optimizer step reduces gradients, so an OOM there is the failing rank's alone: it persists the halved layout
itself and leaves at once (`leave_for_relaunch`, no collective), the launcher ends its peers, and a peer whose
collective fails first sees the request in run_state.json (`peer_requested_relaunch`) and exits with the same
code. Fault injection for tests: LATENTWIRE_INJECT_OOM_AT_STEP (1-based optimizer step, once per run directory),
LATENTWIRE_INJECT_OOM_RANK (only that rank), LATENTWIRE_INJECT_OOM_PHASE (forward | backward | step; default
forward), LATENTWIRE_INJECT_NAN_AT_STEP (comma list: the loss becomes NaN).
Tests: `python -m pytest tests/test_reliability.py tests/test_supervise.py tests/test_oom_phases.py -q`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentwire.distributed import any_rank, max_over_ranks

from latentwire.exit_codes import OOM_RESTART_EXIT_CODE, REQUEUE_EXIT_CODE  # noqa: F401  (raised with Relaunch)

RUN_STATE_FILE = "run_state.json"


class Relaunch(Exception):
    """The run is healthy but must be started again with the same command; `code` is the process exit code."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


class StepOOM(Exception):
    """Every rank agreed that some rank ran out of memory in this step's forward; nothing of the step was applied."""


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------------------------------------------
# SIGUSR1 requeue

REQUEUE_REQUESTED = {"flag": False}  # set by the signal handler, read once per step


def install_requeue_handler() -> None:
    """SIGUSR1 asks for a checkpoint and a requeue exit. Installed as early as possible (launch/train.py does it
    before anything loads) so a signal that arrives while models load is not lost; the handler only sets a flag."""
    signal.signal(signal.SIGUSR1, lambda *_: REQUEUE_REQUESTED.__setitem__("flag", True))


def requeue_requested() -> bool:
    """True on every rank if any rank received SIGUSR1 (a collective)."""
    return any_rank(REQUEUE_REQUESTED["flag"])


# ----------------------------------------------------------------------------------------------------------------
# run state: the batch layout chosen after OOM faults, kept across relaunches


def read_run_state(out: Path) -> dict:
    path = out / RUN_STATE_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RuntimeError(f"{path} is corrupt ({err}); delete it to start from the configured micro-batch") from None


def write_run_state(out: Path, micro_batch: int, grad_accum: int, oom_events: int, injected_step: int | None,
                    relaunch: bool = False) -> None:
    """Persist the layout atomically, adding `injected_step` to the injected OOMs already fired; `relaunch` also
    records that this process asked for a relaunch, and when (`peer_requested_relaunch` reads it). Several ranks
    may write the same state at once: each goes through a temporary file of its own."""
    state = read_run_state(out)
    fired = set(state.get("oom_injected_steps", [])) | ({injected_step} if injected_step else set())
    state.update({"micro_batch": micro_batch, "grad_accum": grad_accum, "oom_events": oom_events,
                  "oom_injected_steps": sorted(fired)})
    if relaunch:
        state["relaunch_requested_at"] = time.time()
    tmp = out / f"{RUN_STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, out / RUN_STATE_FILE)


def peer_requested_relaunch(out: Path, since: float) -> bool:
    """Whether some rank of this run asked for a relaunch after `since` (this process's start): a rank whose
    collective failed because a peer left for a relaunch then exits with the same code, so the launcher passes the
    supervisor 75 whichever rank it sees first."""
    try:
        return float(read_run_state(out).get("relaunch_requested_at", 0.0)) >= since
    except (OSError, RuntimeError, TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# OOM agreement and back-off


def forward_agreed(fn, where: str):
    """Run `fn()` (a forward that holds no collective: ZeRO <= 2); every rank then agrees whether any rank ran out
    of memory, before any backward collective, and all raise StepOOM together if one did."""
    out, oom = None, False
    try:
        out = fn()
    except torch.OutOfMemoryError:
        oom = True
    if any_rank(oom):
        del out
        raise StepOOM(where)
    return out


def halved_layout(micro_batch: int, grad_accum: int, where: str) -> tuple[int, int]:
    """The next (micro-batch, accumulation) with the same examples per rank: the largest divisor of the
    micro-batch at most half of it."""
    if micro_batch == 1:
        raise RuntimeError(f"out of memory at {where} with micro-batch 1: nothing left to halve. Use more ranks, "
                           "ds_configs/zero3_offload.json, shorter data.max_prompt_bytes or smaller receivers.")
    new_micro = max(d for d in range(1, micro_batch // 2 + 1) if micro_batch % d == 0)
    return new_micro, micro_batch * grad_accum // new_micro


def agreed_injected_step(fired: int | None) -> int | None:
    """The injected OOM step that fired on any rank (a collective: every rank calls it), so that whichever rank
    writes the run state records it and a relaunch does not fire it again."""
    step = max_over_ranks(fired or 0)
    return step or None


def leave_for_relaunch(out: Path, rank: int, micro_batch: int, grad_accum: int, oom_events: int,
                       injected_step: int | None, where: str) -> Relaunch:
    """This rank ran out of memory where ranks cannot agree (see the module docstring), or every rank agreed on a
    relaunch: persist the halved layout (`micro_batch`, `grad_accum`, already halved) with the relaunch request and
    return the Relaunch(75) to raise. No collective, no barrier: a peer may be stuck in one, and the launcher ends
    it once this process has gone."""
    print(f"rank {rank}: out of memory at {where}; micro-batch {micro_batch} x accumulation {grad_accum} saved "
          "in run_state.json, leaving for a relaunch from the last checkpoint", file=sys.stderr, flush=True)
    write_run_state(out, micro_batch, grad_accum, oom_events, injected_step, relaunch=True)
    return Relaunch(OOM_RESTART_EXIT_CODE, f"out of memory at {where} (rank {rank})")


def back_off_in_process(zero: int, oom_this_process: int, where: str) -> bool:
    """Whether an agreed OOM can be absorbed without a relaunch: ZeRO <= 2, the first OOM of this process, and
    nothing accumulated yet (the first micro-batch of the step)."""
    return zero <= 2 and oom_this_process == 1 and "micro-batch 1/" in where


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# the non-finite step guard


def _grads_nonfinite(engine, zero: int, params: list[torch.Tensor]) -> bool:
    """This rank's view of whether the accumulated gradients hold inf/NaN (ZeRO-1/2 check their own norms)."""
    if zero == 0:
        return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params)
    if zero == 3:
        return bool(engine.optimizer.has_overflow(partition_gradients=True))  # all-reduced inside
    return False


def _discard_gradients(engine, zero: int) -> None:
    opt = engine.optimizer
    if zero == 3:
        opt._overflow_clean_up(opt.loss_scale)
        return
    opt.zero_grad(set_to_none=True)
    if zero in (1, 2):
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        for key in list(getattr(opt, "averaged_gradients", {}).keys()):
            opt.averaged_gradients[key] = None


def install_step_guard(engine, zero: int, params: list[torch.Tensor], loss_was_bad) -> None:
    """Wrap the optimizer step DeepSpeed takes at each accumulation boundary.

    `loss_was_bad()` returns (and clears) whether this rank saw a non-finite loss in the current step. If any rank
    did, or the gradients are non-finite, every rank drops the accumulated gradients and skips the update. Marking
    the optimizer `overflow` makes DeepSpeed count the step in `skipped_steps` and hold the LR schedule, exactly as
    for an fp16 overflow."""
    opt = engine.optimizer
    original = opt.step

    def guarded_step(*args, **kwargs):
        if any_rank(loss_was_bad() or _grads_nonfinite(engine, zero, params)):
            _discard_gradients(engine, zero)
            opt.overflow = True
            return None
        opt.overflow = False
        return original(*args, **kwargs)

    opt.step = guarded_step


# ----------------------------------------------------------------------------------------------------------------
# fault injection


OOM_PHASES = ("forward", "backward", "step")


class _OOMInBackward(torch.autograd.Function):
    """Identity on the loss whose backward raises the injected OOM: the fault fires inside the engine's real
    backward pass, as an out-of-memory error in autograd would."""

    @staticmethod
    def forward(ctx, loss, injection, step):
        ctx.injection, ctx.step = injection, step
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        ctx.injection.oom_fired = ctx.step + 1
        raise torch.OutOfMemoryError(f"injected out-of-memory fault in the backward of optimizer step {ctx.step + 1}")


@dataclass
class FaultInjection:
    """The faults the environment asks for (see the module docstring), fired by the trainer at fixed points."""

    oom_at: int | None = None  # 1-based optimizer step that raises a real torch.OutOfMemoryError
    oom_phase: str = "forward"  # where in that step: its first forward, its first backward, or its optimizer step
    oom_fired: int | None = None
    nan_steps: set[int] = field(default_factory=set)

    @classmethod
    def from_env(cls, run_state: dict, rank: int) -> "FaultInjection":
        raw = os.environ.get("LATENTWIRE_INJECT_OOM_AT_STEP")
        target_rank = os.environ.get("LATENTWIRE_INJECT_OOM_RANK")
        phase = os.environ.get("LATENTWIRE_INJECT_OOM_PHASE", "").strip() or "forward"
        if phase not in OOM_PHASES:
            raise ValueError(f"LATENTWIRE_INJECT_OOM_PHASE={phase!r}: expected one of {', '.join(OOM_PHASES)}")
        oom_at = int(raw) if raw else None
        if oom_at is not None and (oom_at in run_state.get("oom_injected_steps", [])
                                   or (target_rank is not None and int(target_rank) != rank)):
            oom_at = None  # fired before this relaunch, or meant for another rank
        nan = os.environ.get("LATENTWIRE_INJECT_NAN_AT_STEP", "")
        return cls(oom_at=oom_at, oom_phase=phase, nan_steps={int(x) for x in nan.split(",") if x.strip()})

    def _due(self, phase: str, step: int) -> bool:
        return self.oom_at is not None and self.oom_phase == phase and step + 1 == self.oom_at

    def fire(self, phase: str, step: int) -> None:
        """Raise the injected OOM at this point ("forward": before a forward, "step": before the optimizer step)
        of optimizer step `step + 1`, once."""
        if self._due(phase, step):
            self.oom_fired, self.oom_at = self.oom_at, None
            raise torch.OutOfMemoryError(f"injected out-of-memory fault in the {phase} of optimizer step {step + 1}")

    def before_forward(self, step: int) -> None:
        self.fire("forward", step)

    def arm_backward(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """`loss`, whose backward raises the injected OOM in optimizer step `step + 1` (once)."""
        if not self._due("backward", step):
            return loss
        self.oom_at = None
        return _OOMInBackward.apply(loss, self, step)

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss, made NaN at the injected steps."""
        return loss * float("nan") if step + 1 in self.nan_steps else loss
