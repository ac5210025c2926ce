"""The LatentWire training recipe: setup, train loop, save, load — top to bottom.

Entry points: `launch/train.py` (plain python, torchrun or the deepspeed launcher):

    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config configs/tiny.json \
        --output_dir runs/demo

One DeepSpeed engine wraps the trainable encoder/adapters AND the frozen receivers (so ZeRO-3 partitions them
too); only trainable parameters reach the optimizer. Re-running the same command resumes from
`checkpoints/latest`. The run directory holds config.json, run_info.json, metrics.jsonl, checkpoints/ and eval/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentwire import config as config_lib
from latentwire import data as data_lib
from latentwire import features
from latentwire.features import curriculum
from latentwire.distributed import (all_reduce_mean, barrier, build_ds_config, init_distributed, read_ds_config,
                                    zero_stage)
from latentwire.model import LatentWire
from latentwire.receivers import Receiver, gathered, is_partitioned

TRAINABLE_FILE = "trainable.safetensors"
REQUEUE_REQUESTED = {"flag": False}  # set by the SIGUSR1 handler (install_requeue_handler), read once per step


def install_requeue_handler() -> None:
    """SIGUSR1 (slurm's warning before the time limit) asks for a checkpoint and a requeue exit. Installed as early
    as possible so a signal that arrives while models load is not lost; the handler only sets a flag."""
    import signal

    signal.signal(signal.SIGUSR1, lambda *_: REQUEUE_REQUESTED.__setitem__("flag", True))
MANIFEST_FILE = "manifest.json"


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: config_lib.Config
    out: Path
    rank: int
    world: int
    ds_config: dict
    engine: object
    model: LatentWire
    train_examples: list
    eval_examples: list
    start_step: int = 0
    stats: data_lib.DataStats = field(default_factory=data_lib.DataStats)
    micro_batch: int = 1  # current layout (halved after an OOM; persisted in run_state.json)
    grad_accum: int = 1
    oom_events: int = 0  # cumulative over restarts
    oom_this_process: int = 0
    step_bad: bool = False  # a non-finite loss was seen in the current optimizer step (this rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------------------------
# setup


def lr_lambda(cfg: config_lib.Config):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr over train.decay_steps (constant if 0), as a
    multiplier of the peak lr. The horizon is not max_steps: a run extended by resuming keeps its schedule."""
    import math

    tr = cfg.train

    def fn(step: int) -> float:
        if step < tr.warmup_steps:
            return (step + 1) / (tr.warmup_steps + 1)
        if tr.decay_steps <= 0:
            return 1.0
        progress = min(1.0, (step - tr.warmup_steps) / max(1, tr.decay_steps - tr.warmup_steps))
        return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_engine(model: LatentWire, ds_config: dict, cfg: config_lib.Config, step_offset: int = 0):
    """The DeepSpeed engine over `model`: only trainable parameters (grouped per feature) reach AdamW; the LR
    schedule continues from `step_offset` (the first step of the current latent-length stage)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    fn = lr_lambda(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=features.optimizer_groups(model),
                                           config=ds_config,
                                           lr_scheduler=lambda opt: LambdaLR(opt, lambda s: fn(s + step_offset)))
    restrict_checkpoint_loads(engine)
    return engine


def restrict_checkpoint_loads(engine) -> None:
    """DeepSpeed's checkpoint engine unpickles its state files with weights_only=False. Ours loads them with
    weights_only=True, allowing only the three DeepSpeed types its ZeRO-0/2/3 state holds; anything else in a
    checkpoint file is an error, never code run on load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def _stage_start(cfg: config_lib.Config, stage: int) -> int:
    return ([0] + list(cfg.curriculum.stage_steps))[stage]


def _resume_stage(cfg: config_lib.Config, out: Path, ds_config: dict) -> int:
    """The latent-length stage the run resumes in (0 for a new run or without staged M)."""
    if not cfg.curriculum.m_stages:
        return 0
    if zero_stage(ds_config) == 3:
        raise config_lib.ConfigError("curriculum.m_stages: the staged-M hand-off rebuilds the engine in process, "
                                     "which ZeRO-3 (partitioned receivers) does not support; use ZeRO-2 or one stage")
    path = find_resumable(out, log=lambda *_: None)
    if path is None:
        return 0
    # The checkpoint records the stage its weights belong to (a run stopped right at a boundary has not handed
    # off yet; the loop does that next).
    step = json.loads((path / "trainer_state.json").read_text())["step"]
    m_saved = json.loads((path / "config.json").read_text())["encoder"]["m_shared"]
    stages = [i for i, m in enumerate(cfg.curriculum.m_stages) if m == m_saved and i <= curriculum.stage_at(cfg, step)]
    if not stages:
        raise config_lib.ConfigError(f"{path}: its m_shared {m_saved} is not a stage of curriculum.m_stages "
                                     f"{cfg.curriculum.m_stages} at step {step}")
    return stages[-1]


def hand_off(run: Run, step: int, stage: int) -> None:
    """Move to the next latent-length stage: trained weights carried over (shared-slot tables resized, see
    curriculum.handoff_state), optimizer and scheduler rebuilt, then a checkpoint of the new stage's start."""
    old = run.model
    new = curriculum.handoff_model(old, stage)
    new.teachers, new.inject_nan_steps = old.teachers, old.inject_nan_steps
    new.inject_oom_at, new.inject_oom_fired = old.inject_oom_at, old.inject_oom_fired
    run.model = new
    run.engine = build_engine(new, run.ds_config, run.cfg, _stage_start(run.cfg, stage))
    install_step_guard(run)
    if run.is_main:
        print(f"step {step}: latent stage {stage}, m_shared {old.cfg.encoder.m_shared} -> {new.cfg.encoder.m_shared}",
              flush=True)
    save_checkpoint(run, step)


def load_receivers(cfg: config_lib.Config, ds_config: dict) -> list[Receiver]:
    """Load the frozen receivers; under ZeRO-3 they are partitioned as they load (HF's DeepSpeed integration
    is kept alive only while loading, so nothing else is affected)."""
    ctx = contextlib.nullcontext()
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        ctx = _hf_ds_alive(HfDeepSpeedConfig(ds_config))
    with ctx:
        return [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]


@contextlib.contextmanager
def _hf_ds_alive(hf_ds_config):
    from transformers.integrations import deepspeed as hf_ds

    try:
        yield hf_ds_config
    finally:
        hf_ds.unset_hf_deepspeed_config()


def _resolved_config_matches(out: Path, cfg: config_lib.Config, allow_change: bool) -> None:
    """Refuse to resume a run directory with a different config (a diff of the changed keys), except for the
    step budget, or anything at all with --allow_config_change."""
    saved = out / "config.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text())
    changed = config_lib.diff_configs(old, config_lib.to_dict(cfg))
    blocking = [c for c in changed if not c.startswith(("train.max_steps:", "eval."))]
    if blocking and not allow_change:
        raise config_lib.ConfigError(f"{out} was started with a different config; changed keys:\n  "
                                     + "\n  ".join(blocking)
                                     + "\nuse a new --output_dir, or pass --allow_config_change to resume anyway")


def setup(cfg: config_lib.Config, out: Path, ds_path: str | None, allow_config_change: bool = False) -> Run:
    rank, world = init_distributed()
    torch.manual_seed(cfg.train.seed)
    _resolved_config_matches(out, cfg, allow_config_change)
    train_examples, eval_examples = data_lib.load_splits(cfg.data)
    cuda = torch.cuda.is_available()
    receivers_h = _max_hidden_size(cfg)
    state = read_run_state(out)
    micro = state.get("micro_batch", cfg.train.micro_batch)
    accum = state.get("grad_accum", cfg.train.grad_accum)
    if micro * accum != cfg.train.micro_batch * cfg.train.grad_accum:
        raise RuntimeError(f"{out / RUN_STATE_FILE}: micro_batch {micro} x grad_accum {accum} does not keep the "
                           f"configured {cfg.train.micro_batch} x {cfg.train.grad_accum} per rank")
    ds_config = build_ds_config(read_ds_config(ds_path), micro, accum, world, cfg.train.lr, cfg.train.weight_decay,
                                cfg.train.grad_clip, receivers_h, cuda)
    receivers = load_receivers(cfg, ds_config)
    torch.manual_seed(cfg.train.seed)  # trainable init does not depend on how receivers were loaded
    stage = _resume_stage(cfg, out, ds_config)
    model = LatentWire(curriculum.stage_config(cfg, stage) if cfg.curriculum.m_stages else cfg, receivers)
    if cuda:
        model.encoder.cuda()
        model.adapters.cuda()
    from latentwire.teachers import load_teachers

    model.attach_teachers(load_teachers(cfg, receivers, ds_config))  # not submodules: no optimizer state, no checkpoint
    out.mkdir(parents=True, exist_ok=True)  # only once every input has been checked

    engine = build_engine(model, ds_config, cfg, _stage_start(cfg, stage))
    run = Run(cfg, out, rank, world, ds_config, engine, model, train_examples, eval_examples,
              micro_batch=micro, grad_accum=accum, oom_events=state.get("oom_events", 0))
    model.inject_oom_at = _oom_injection_step(state)
    model.inject_nan_steps = _nan_injection_steps()
    install_step_guard(run)
    run.start_step = load_latest(run)
    per_rank = frozen_bytes_per_rank(run)
    if run.is_main:
        config_lib.save_config(cfg, out / "config.json")
        write_run_info(run, per_rank)
    barrier()
    return run


def _max_hidden_size(cfg: config_lib.Config) -> int:
    from transformers import AutoConfig

    from latentwire.receivers import resolve_model_path

    sizes = []
    for r in cfg.receivers:
        try:
            sizes.append(int(AutoConfig.from_pretrained(resolve_model_path(r.path)).hidden_size))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"cannot read the model config of receiver {r.name!r} at {r.path!r}: {err}") from None
    return max(sizes)


def frozen_bytes(model: LatentWire) -> tuple[int, int]:
    """(total bytes of frozen parameters, bytes actually resident on this rank: the partition under ZeRO-3)."""
    total = resident = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        size = p.element_size()
        if is_partitioned(p):
            total += p.ds_numel * size
            resident += p.ds_tensor.numel() * size
        else:
            total += p.numel() * size
            resident += p.numel() * size
    return total, resident


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def frozen_bytes_per_rank(run: Run) -> list[int]:
    """Resident frozen bytes of every rank (a collective: all ranks call it)."""
    import torch.distributed as dist

    _, resident = frozen_bytes(run.model)
    if run.world == 1:
        return [resident]
    sizes: list = [None] * run.world
    dist.all_gather_object(sizes, resident)
    return sizes


def write_run_info(run: Run, per_rank: list[int]) -> None:
    import deepspeed
    import transformers

    total, _ = frozen_bytes(run.model)
    info = {
        "world_size": run.world, "zero_stage": zero_stage(run.ds_config),
        "micro_batch": run.micro_batch, "grad_accum": run.grad_accum,
        "global_batch": run.micro_batch * run.grad_accum * run.world, "oom_events": run.oom_events,
        "frozen_bytes_total": total, "frozen_bytes_per_rank": per_rank,
        "frozen_fraction_per_rank": [b / total for b in per_rank] if total else [],
        "trainable_params": sum(p.numel() if not is_partitioned(p) else p.ds_numel
                                for p in run.model.trainable_parameters()),
        "train_examples": len(run.train_examples), "eval_examples": len(run.eval_examples),
        "prompts_truncated": run.stats.prompts_truncated, "invalid_utf8": run.stats.invalid_utf8,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__},
        "git_sha": _git_sha(), "start_step": run.start_step,
    }
    (run.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# run state (survives relaunches: the batch layout chosen after OOM faults)

RUN_STATE_FILE = "run_state.json"


def read_run_state(out: Path) -> dict:
    path = out / RUN_STATE_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RuntimeError(f"{path} is corrupt ({err}); delete it to start from the configured micro-batch") from None


def write_run_state(run: Run) -> None:
    if not run.is_main:
        return
    state = read_run_state(run.out)
    fired = sorted(set(state.get("oom_injected_steps", [])) | ({run.model.inject_oom_fired}
                                                                if run.model.inject_oom_fired else set()))
    state.update({"micro_batch": run.micro_batch, "grad_accum": run.grad_accum, "oom_events": run.oom_events,
                  "oom_injected_steps": fired})
    tmp = run.out / (RUN_STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, run.out / RUN_STATE_FILE)


def _oom_injection_step(state: dict) -> int | None:
    """LATENTWIRE_INJECT_OOM_AT_STEP=N (1-based optimizer step) fires once per run directory, on every rank or on
    LATENTWIRE_INJECT_OOM_RANK only."""
    raw = os.environ.get("LATENTWIRE_INJECT_OOM_AT_STEP")
    if not raw:
        return None
    step = int(raw)
    target_rank = os.environ.get("LATENTWIRE_INJECT_OOM_RANK")
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if target_rank is not None and int(target_rank) != rank:
        return None
    return None if step in state.get("oom_injected_steps", []) else step


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def trainable_state(run: Run) -> dict[str, torch.Tensor]:
    """Full trainable state on every rank (gathered under ZeRO-3), as contiguous CPU tensors."""
    params = [p for n, p in run.model.named_parameters() if not n.startswith("receivers.") or p.requires_grad]
    with gathered(params):
        return {k: v.detach().cpu().contiguous().clone() for k, v in run.model.trainable_state_dict().items()}


def save_checkpoint(run: Run, step: int) -> Path:
    """Write checkpoints/step_<N>/ through a temporary directory, then move `latest` to it atomically."""
    from safetensors.torch import save_file

    root = run.out / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    run.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False, exclude_frozen_parameters=True)
    state = trainable_state(run)
    if run.is_main:
        save_file(state, str(tmp / TRAINABLE_FILE))
        trainer_state = {"step": step, "micro_batch": run.micro_batch, "grad_accum": run.grad_accum,
                         "world_size": run.world, "oom_events": run.oom_events,
                         "features": features.checkpoint_state(run.model),
                         "examples_seen": step * run.micro_batch * run.grad_accum * run.world}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        config_lib.save_config(run.model.cfg, tmp / "config.json")
        contracts = {name: r.contract.to_dict() for name, r in run.model.receivers.items()}
        (tmp / "contract.json").write_text(json.dumps(contracts, indent=2) + "\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        link_tmp = root / ".latest_tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        link_tmp.symlink_to(final.name)
        os.replace(link_tmp, root / "latest")
        _prune(root, run.cfg.train.keep_last)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints, and always the one checkpoints/best points at."""
    from latentwire.eval import best_checkpoint

    best = best_checkpoint(root)
    for path in complete_checkpoints(root)[keep:]:
        if path.resolve() != best:
            shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """Check every file against the manifest; raise naming the first bad file."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RuntimeError(f"checkpoint {path} has no {MANIFEST_FILE}: incomplete")
    for rel, digest in json.loads(manifest_path.read_text()).items():
        f = path / rel
        if not f.is_file():
            raise RuntimeError(f"checkpoint {path}: file {rel} listed in the manifest is missing")
        if _sha256(f) != digest:
            raise RuntimeError(f"checkpoint {path}: file {rel} does not match its sha256 (corrupt)")


def complete_checkpoints(root: Path) -> list[Path]:
    """step_<N> directories, newest first (temporary .tmp_step_* directories are never candidates)."""
    steps = [(int(p.name[5:]), p) for p in root.glob("step_*") if p.name[5:].isdigit()]
    return [p for _, p in sorted(steps, reverse=True)]


def find_resumable(out: Path, log=print) -> Path | None:
    """The checkpoint to resume from: `latest` if it verifies, else the newest older one that does. A corrupt or
    incomplete checkpoint is reported by name and skipped, never loaded."""
    root = out / "checkpoints"
    latest = root / "latest"
    candidates = []
    if latest.exists():
        candidates.append(latest.resolve())
    candidates += [p for p in complete_checkpoints(root) if p not in candidates]
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except RuntimeError as err:
            log(f"skipping checkpoint {path}: {err}")
    return None


def load_latest(run: Run) -> int:
    """Resume from the newest verified checkpoint: engine state, optimizer, scheduler. Returns the step."""
    log = print if run.is_main else (lambda *_: None)
    path = find_resumable(run.out, log)
    if path is None:
        return 0
    run.engine.load_checkpoint(str(path), tag="ds", load_module_strict=False, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    step = trainer_state["step"]
    if "features" in trainer_state:
        features.load_checkpoint_state(run.model, trainer_state["features"])
    if run.is_main:
        _truncate_metrics(run.out / "metrics.jsonl", step)
        print(f"resumed from {path} at step {step}", flush=True)
    return step


def _truncate_metrics(path: Path, step: int) -> None:
    """Rows written after the checkpoint we resume from are superseded by the rerun, not duplicated."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------------
# train


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _nan_injection_steps() -> set[int]:
    raw = os.environ.get("LATENTWIRE_INJECT_NAN_AT_STEP", "")
    return {int(x) for x in raw.split(",") if x.strip()}


def _grads_nonfinite(run: Run) -> bool:
    """This rank's view of whether the accumulated gradients hold inf/NaN (ZeRO-2 checks its own; see below)."""
    stage = zero_stage(run.ds_config)
    if stage == 0:
        return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in run.model.trainable_parameters())
    if stage == 3:
        return bool(run.engine.optimizer.has_overflow(partition_gradients=True))  # all-reduced inside
    return False


def _discard_gradients(run: Run) -> None:
    opt = run.engine.optimizer
    stage = zero_stage(run.ds_config)
    if stage == 3:
        opt._overflow_clean_up(opt.loss_scale)
        return
    opt.zero_grad(set_to_none=True)
    if stage in (1, 2):
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        for key in list(getattr(opt, "averaged_gradients", {}).keys()):
            opt.averaged_gradients[key] = None


def install_step_guard(run: Run) -> None:
    """Non-finite guard around the optimizer step DeepSpeed takes at each accumulation boundary.

    If any rank saw a non-finite loss in this optimizer step, or the gradients are non-finite, every rank
    (the decision is all-reduced) drops the accumulated gradients and skips the update. Marking the optimizer
    `overflow` makes DeepSpeed count the step in `skipped_steps` and hold the LR schedule, exactly as for an fp16
    overflow. ZeRO-1/2 optimizers also skip non-finite gradient norms by themselves."""
    opt = run.engine.optimizer
    original = opt.step

    def guarded_step(*args, **kwargs):
        bad = any_rank(run.step_bad or _grads_nonfinite(run))
        run.step_bad = False
        if bad:
            _discard_gradients(run)
            opt.overflow = True
            return None
        opt.overflow = False
        return original(*args, **kwargs)

    opt.step = guarded_step


def keep_best(run: Run, step: int, saved: Path | None, eval_out: dict) -> None:
    """Point checkpoints/best at this step when its held-out metric beats the best so far (all ranks agree,
    and all have read best.json before rank 0 rewrites it)."""
    from latentwire.eval import is_better, read_best, update_best

    root = run.out / "checkpoints"
    if any_rank(is_better(eval_out["value"], read_best(root), eval_out["metric"])):
        saved = saved or save_checkpoint(run, step)
        if run.is_main:
            update_best(root, saved, eval_out["value"], eval_out["metric"])
        barrier()


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class StepOOM(Exception):
    """Some rank ran out of memory during this optimizer step; nothing of the step was applied."""


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is set on any rank (all-reduce MAX)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def loss_norms(run: Run, step: int, contracts: dict) -> dict[str, float]:
    """Per receiver: world * grad_accum / supervised rows in this step's whole global batch.

    Every rank computes it from the data order alone (no communication), so losses are token means over the
    global batch and the update does not depend on how it is split over ranks and micro-batches."""
    k = curriculum.k_at(run.cfg, step, run.model.curriculum_state)
    n = len(run.train_examples)
    examples = [run.train_examples[i]
                for accum in range(run.grad_accum) for rank in range(run.world)
                for i in data_lib.micro_batch_indices(step, run.micro_batch, accum, run.grad_accum, rank, run.world,
                                                      n, run.cfg.data.seed)]
    norms = {}
    for name, contract in contracts.items():
        rows = sum(min(k, len(contract.answer_ids(ex.answers[0]))) for ex in examples)
        norms[name] = run.world * run.grad_accum / max(1, rows)
    return norms


def run_step(run: Run, step: int, contracts: dict, device) -> tuple[float, dict]:
    """One optimizer step over `grad_accum` micro-batches. Every rank agrees after each forward whether any
    rank ran out of memory (before any backward collective), so an OOM never leaves ranks out of step."""
    cfg = run.cfg
    n = len(run.train_examples)
    norms = loss_norms(run, step, contracts)
    losses_, parts_acc = [], {}
    for accum in range(run.grad_accum):
        idx = data_lib.micro_batch_indices(step, run.micro_batch, accum, run.grad_accum, run.rank, run.world, n,
                                           cfg.data.seed)
        batch = data_lib.collate([run.train_examples[i] for i in idx], contracts, cfg.data.max_prompt_bytes,
                                 cfg.losses.k_tokens, run.stats)
        for name, norm in norms.items():
            batch["receivers"][name]["loss_norm"] = norm
        out, oom = None, False
        try:
            out = run.engine(_to_device(batch, device), step)
        except torch.OutOfMemoryError:
            oom = True
        if any_rank(oom):
            del out, batch
            raise StepOOM(f"step {step + 1}, micro-batch {accum + 1}/{run.grad_accum}")
        if not torch.isfinite(out["loss"].detach()).all():
            run.step_bad = True  # still backpropagated, so every rank runs the same collectives; discarded below
        run.engine.backward(out["loss"])
        run.engine.step()
        losses_.append(float(out["loss"].detach()))
        for k, v in out["parts"].items():
            parts_acc.setdefault(k, []).append(v)
    keys = sorted(parts_acc)
    local = [sum(losses_) / len(losses_)] + [sum(parts_acc[k]) / len(parts_acc[k]) for k in keys]
    reduced = all_reduce_mean(local)
    return reduced[0], dict(zip(keys, reduced[1:]))


def handle_oom(run: Run, where: str) -> None:
    """Back off after an agreed OOM: in process under ZeRO <= 2 (first time, nothing accumulated yet), otherwise
    persist the smaller micro-batch and exit with OOM_RESTART_EXIT_CODE for the supervisor to relaunch."""
    import gc

    run.oom_events += 1
    run.oom_this_process += 1
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    per_rank = run.micro_batch * run.grad_accum
    if run.micro_batch == 1:
        raise RuntimeError(f"out of memory at {where} with micro-batch 1: nothing left to halve. Use more ranks, "
                           "ds_configs/zero3_offload.json, shorter data.max_prompt_bytes or smaller receivers.")
    new_micro = max(d for d in range(1, run.micro_batch // 2 + 1) if run.micro_batch % d == 0)
    new_accum = per_rank // new_micro
    in_process = zero_stage(run.ds_config) <= 2 and run.oom_this_process == 1 and "micro-batch 1/" in where
    if run.is_main:
        print(f"out of memory at {where}: micro-batch {run.micro_batch} -> {new_micro}, gradient accumulation "
              f"{run.grad_accum} -> {new_accum}, global batch kept at {per_rank * run.world}"
              + ("" if in_process else "; exiting for a relaunch from the last checkpoint"), flush=True)
    run.micro_batch, run.grad_accum = new_micro, new_accum
    write_run_state(run)
    if in_process:
        run.engine.set_train_micro_batch_size(new_micro)
        run.engine.set_train_batch_size(new_micro * new_accum * run.world)
        return
    barrier()
    from launch.exit_codes import OOM_RESTART_EXIT_CODE

    sys.stdout.flush()
    os._exit(OOM_RESTART_EXIT_CODE)  # skip interpreter teardown: other ranks may still hold collectives


def train(run: Run) -> None:
    cfg = run.cfg
    tr = cfg.train
    contracts = {name: r.contract for name, r in run.model.receivers.items()}
    device = run.engine.device
    install_requeue_handler()
    progress = None
    if run.is_main:
        from tqdm import tqdm

        progress = tqdm(total=tr.max_steps, initial=run.start_step, desc="train", dynamic_ncols=True)
    metrics_path = run.out / "metrics.jsonl"
    step = run.start_step
    bad_streak = 0
    if cfg.eval.every and cfg.eval.at_start and step == 0:  # the untrained baseline every later eval is read against
        from latentwire.eval import periodic_eval

        synced = run.world > 1 and zero_stage(run.ds_config) == 3
        eval_out = periodic_eval(run.model, run.eval_examples, 0, synced=synced)
        if run.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps({"step": 0, **eval_out["log"]}) + "\n")
    while step < tr.max_steps:
        if cfg.curriculum.m_stages:
            stage = curriculum.stage_at(cfg, step)
            if run.model.cfg.encoder.m_shared != cfg.curriculum.m_stages[stage]:
                hand_off(run, step, stage)
        skipped_before = run.engine.skipped_steps
        started = time.perf_counter()
        try:
            loss, parts = run_step(run, step, contracts, device)
        except StepOOM as err:
            handle_oom(run, str(err))
            continue  # the same global batch again, now in smaller micro-batches
        features.after_step(run.model, parts)  # parts are all-reduced: every rank takes the same decision
        elapsed = time.perf_counter() - started
        skipped = run.engine.skipped_steps > skipped_before
        bad_streak = bad_streak + 1 if skipped else 0
        global_batch = run.micro_batch * run.grad_accum * run.world
        finite = lambda v: v if isinstance(v, float) and v == v and abs(v) != float("inf") else None  # noqa: E731
        row = {"step": step + 1, "loss": finite(loss), **{k: finite(v) for k, v in parts.items()},
               "skipped": skipped, "skipped_steps": run.engine.skipped_steps, "lr": run.engine.get_lr()[0],
               "grad_norm": finite(_grad_norm(run.engine)), "micro_batch": run.micro_batch, "grad_accum": run.grad_accum,
               "global_batch": global_batch, "oom_events": run.oom_events, "examples_per_s": global_batch / elapsed}
        eval_out = None
        if cfg.eval.every and (step + 1) % cfg.eval.every == 0:
            from latentwire.eval import periodic_eval

            synced = run.world > 1 and zero_stage(run.ds_config) == 3
            eval_out = periodic_eval(run.model, run.eval_examples, step + 1, synced=synced)
            row.update(eval_out["log"])
        if run.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            progress.update(1)
            if (step + 1) % tr.log_every == 0:
                progress.set_postfix(loss="skipped" if skipped else f"{loss:.3f}", lr=f"{row['lr']:.2e}")
        step += 1
        if bad_streak >= tr.max_consecutive_bad_steps:
            save_checkpoint(run, step)  # skipped steps left the weights at the last good state
            raise NonFiniteError(f"{bad_streak} consecutive optimizer steps (up to step {step}) had a non-finite loss "
                                 f"or gradient and were skipped; stopping (train.max_consecutive_bad_steps="
                                 f"{tr.max_consecutive_bad_steps}). The last good weights are in checkpoints/step_{step}.")
        requeue = any_rank(REQUEUE_REQUESTED["flag"])
        saved = None
        if step % tr.save_every == 0 or step == tr.max_steps or requeue:
            saved = save_checkpoint(run, step)
        if eval_out is not None:
            keep_best(run, step, saved, eval_out)
        if requeue and step < tr.max_steps:
            from launch.exit_codes import REQUEUE_EXIT_CODE

            if run.is_main:
                print(f"SIGUSR1: checkpointed step {step}; exiting with {REQUEUE_EXIT_CODE} to be requeued", flush=True)
            barrier()
            sys.stdout.flush()
            os._exit(REQUEUE_EXIT_CODE)
    if progress is not None:
        progress.close()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def evaluate_run(run: Run) -> dict | None:
    """Evaluate the in-memory model on the held-out split; every rank runs the same work, rank 0 writes."""
    from latentwire.eval import evaluate, format_table, write_outputs

    synced = run.world > 1 and zero_stage(run.ds_config) == 3
    result, rows = evaluate(run.model, run.eval_examples, synced=synced, features=active_features(run.cfg))
    if run.is_main:
        write_outputs(result, rows, run.out / "eval", run.out / "metrics.jsonl")
        print(format_table(result), flush=True)
    barrier()
    return result


def active_features(cfg: config_lib.Config) -> list[str]:
    return features.active(cfg)


def main(cfg: config_lib.Config, out: Path, ds_path: str | None, allow_config_change: bool = False) -> Run:
    run = setup(cfg, out, ds_path, allow_config_change)
    train(run)
    if cfg.eval.at_end:
        evaluate_run(run)
    return run
