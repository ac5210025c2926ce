"""The LatentWire training recipe: setup, the step, the loop, the end — read it top to bottom.

Entry point `launch/train.py` (plain python, torchrun or the deepspeed launcher):

    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config configs/tiny.json \
        --output_dir runs/demo

One DeepSpeed engine wraps the trainable encoder/adapters AND the frozen receivers (so ZeRO-3 partitions them
too); only trainable parameters reach the optimizer. Re-running the same command resumes from
`checkpoints/latest`. The run directory holds config.json, run_info.json, run_state.json, metrics.jsonl,
checkpoints/ (latentwire/checkpoint.py) and eval/. Faults (OOM, non-finite steps, SIGUSR1, injection) are handled
by latentwire/faults.py; when the run must be started again it raises `faults.Relaunch`, which only
launch/train.py turns into an exit code.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentwire import checkpoint as ckpt
from latentwire import config as config_lib
from latentwire import curriculum, faults, features
from latentwire import data as data_lib
from latentwire.distributed import (all_reduce_mean, any_rank, barrier, build_ds_config, frozen_bytes, gather_object,
                                    gathered, init_distributed, is_partitioned, partitioned_loading, read_ds_config,
                                    zero_stage)
from latentwire.eval import evaluate, format_table, periodic_eval, write_outputs
from latentwire.model import LatentWire
from latentwire.monitor import Monitor, environment, finite_or_none
from latentwire.receivers import Receiver, max_hidden_size
from latentwire.teachers import load_teachers


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
    splits: data_lib.Splits  # train / validation (everything decided during training) / test (the final eval)
    faults: faults.FaultInjection
    start_step: int = 0
    stats: data_lib.DataStats = field(default_factory=data_lib.DataStats)
    micro_batch: int = 1  # current layout (halved after an OOM; persisted in run_state.json)
    grad_accum: int = 1
    oom_events: int = 0  # cumulative over relaunches
    oom_this_process: int = 0
    loss_bad: bool = False  # this rank saw a non-finite loss in the current optimizer step
    data_stage: int = 0  # curriculum.data_stages index; len(data_stages) = the run's own data
    data_stage_start: int = 0  # the optimizer step the current data stage began at
    own_splits: data_lib.Splits | None = None  # the run's own splits (`splits` holds a data stage's while one runs)
    stage_splits: list = field(default_factory=list)  # the splits of each curriculum.data_stages entry

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def zero(self) -> int:
        return zero_stage(self.ds_config)

    @property
    def synced(self) -> bool:
        """Evaluation must run the same forwards on every rank: the receivers are partitioned."""
        return self.world > 1 and self.zero == 3


# ================================================================================================================
# 1. setup: config check, data, DeepSpeed config, frozen receivers, trainable model, engine, resume


def setup(cfg: config_lib.Config, out: Path, ds_path: str | None, allow_config_change: bool = False) -> Run:
    rank, world = init_distributed()
    torch.manual_seed(cfg.train.seed)
    config_lib.check_resumable(out / "config.json", cfg, allow_config_change)
    splits = data_lib.load_splits(cfg.data)
    # Every data stage's files are read and checked now, not hours later when the run reaches that stage.
    stage_splits = [data_lib.stage_splits(spec, cfg.data, splits, f"curriculum.data_stages.{k}")
                    for k, spec in enumerate(cfg.curriculum.data_stages)]

    # The batch layout may have been halved by an OOM in an earlier process of this run; it always keeps the
    # configured examples per rank, so the global batch (and the data order) never changes.
    state = faults.read_run_state(out)
    micro = state.get("micro_batch", cfg.train.micro_batch)
    accum = state.get("grad_accum", cfg.train.grad_accum)
    if micro * accum != cfg.train.micro_batch * cfg.train.grad_accum:
        raise RuntimeError(f"{out / faults.RUN_STATE_FILE}: micro_batch {micro} x grad_accum {accum} does not keep "
                           f"the configured {cfg.train.micro_batch} x {cfg.train.grad_accum} per rank")
    cuda = torch.cuda.is_available()
    ds_config = build_ds_config(read_ds_config(ds_path), micro, accum, world, cfg.train.lr, cfg.train.weight_decay,
                                cfg.train.grad_clip, max_hidden_size(cfg.receivers), cuda)

    # Frozen receivers first (partitioned as they load under ZeRO-3), then the trainables from a fixed seed, so
    # the trainable init does not depend on how the receivers were loaded.
    receivers = load_receivers(cfg, ds_config)
    torch.manual_seed(cfg.train.seed)
    stage = _resume_stage(cfg, out, ds_config)
    model = LatentWire(curriculum.stage_config(cfg, stage) if cfg.curriculum.m_stages else cfg, receivers)
    if cuda:
        model.encoder.cuda()
        model.adapters.cuda()
    # Larger teachers are not submodules: no optimizer state, not in checkpoints, not wrapped by the engine.
    model.attach_teachers(load_teachers(cfg, receivers, ds_config))
    out.mkdir(parents=True, exist_ok=True)  # only once every input has been checked

    engine = build_engine(model, ds_config, cfg, curriculum.stage_start(cfg, stage))
    run = Run(cfg, out, rank, world, ds_config, engine, model, splits,
              faults.FaultInjection.from_env(state, rank), micro_batch=micro, grad_accum=accum,
              oom_events=state.get("oom_events", 0))
    _guard_steps(run)
    run.own_splits, run.stage_splits = splits, stage_splits
    run.start_step = resume(run)
    enter_data_stage(run, run.data_stage, run.data_stage_start)
    per_rank = gather_object(frozen_bytes(model)[1])
    if run.is_main:
        config_lib.save_config(cfg, out / "config.json")
        write_run_info(run, per_rank)
    barrier()
    return run


def load_receivers(cfg: config_lib.Config, ds_config: dict) -> list[Receiver]:
    """Load the frozen receivers; under ZeRO-3 they are partitioned as they load, each in its own dtype."""
    zero3 = zero_stage(ds_config) == 3
    receivers = []
    for r in cfg.receivers:
        with partitioned_loading(ds_config if zero3 else None, r.dtype):
            receivers.append(Receiver.load(r, cfg.data.max_answer_tokens))
    return receivers


def lr_lambda(cfg: config_lib.Config):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr over train.decay_steps (constant if 0), as a
    multiplier of the peak lr. The horizon is not max_steps: a run extended by resuming keeps its schedule."""
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
    ckpt.restrict_checkpoint_loads(engine)
    return engine


def _guard_steps(run: Run) -> None:
    """Every optimizer step goes through the non-finite guard (faults.install_step_guard)."""
    def loss_was_bad() -> bool:
        bad, run.loss_bad = run.loss_bad, False
        return bad

    faults.install_step_guard(run.engine, run.zero, run.model.trainable_parameters(), loss_was_bad)


def write_run_info(run: Run, per_rank: list[int]) -> None:
    """run_info.json: the layout, the resident frozen bytes of every rank, the splits, device and versions."""
    total, _ = frozen_bytes(run.model)
    info = {
        "world_size": run.world, "zero_stage": run.zero, "micro_batch": run.micro_batch,
        "grad_accum": run.grad_accum, "global_batch": run.cfg.train.global_batch(run.world),
        "oom_events": run.oom_events, "frozen_bytes_total": total, "frozen_bytes_per_rank": per_rank,
        "frozen_fraction_per_rank": [b / total for b in per_rank] if total else [],
        "trainable_params": sum(p.ds_numel if is_partitioned(p) else p.numel()
                                for p in run.model.trainable_parameters()),
        "splits": {name: data_lib.split_digest(examples) for name, examples in run.own_splits._asdict().items()},
        **({"data_stage_splits": [{name: data_lib.split_digest(examples)
                                   for name, examples in staged._asdict().items() if name != "test"}
                                  for staged in run.stage_splits]} if run.stage_splits else {}),
        "prompts_truncated": run.stats.prompts_truncated, "invalid_utf8": run.stats.invalid_utf8,
        **environment(), "start_step": run.start_step,
    }
    (run.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


# ================================================================================================================
# 2. checkpoints: what the trainer writes and reads back (the files themselves: latentwire/checkpoint.py)


def save(run: Run, step: int) -> Path:
    """checkpoints/step_<step>/ on every rank (a collective: DeepSpeed writes each rank's shard), then `latest`."""
    root = run.out / "checkpoints"
    if run.is_main:
        ckpt.prepare_staging(root, step)
    barrier()
    run.engine.save_checkpoint(str(ckpt.staging_dir(root, step)), tag=ckpt.DS_TAG, save_latest=False,
                               exclude_frozen_parameters=True)
    # The full trainable state on every rank (gathered under ZeRO-3), as contiguous CPU tensors.
    params = [p for n, p in run.model.named_parameters() if not n.startswith("receivers.") or p.requires_grad]
    with gathered(params):
        trainable = {k: v.detach().cpu().contiguous().clone() for k, v in run.model.trainable_state_dict().items()}
    final = root / f"step_{step}"
    if run.is_main:
        trainer_state = {"step": step, "micro_batch": run.micro_batch, "grad_accum": run.grad_accum,
                         "world_size": run.world, "oom_events": run.oom_events,
                         "features": features.checkpoint_state(run.model),
                         "examples_seen": step * run.cfg.train.global_batch(run.world),
                         "data_stage": run.data_stage, "data_stage_start": run.data_stage_start}
        contracts = {name: r.contract.to_dict() for name, r in run.model.receivers.items()}
        final = ckpt.commit_checkpoint(root, step, trainable, trainer_state, run.model.cfg, contracts,
                                       run.cfg.train.keep_last)
    barrier()
    return final


def resume(run: Run) -> int:
    """Resume from the newest verified checkpoint (engine, optimizer, scheduler, curriculum); returns its step."""
    path = ckpt.find_resumable(run.out, print if run.is_main else (lambda *_: None))
    if path is None:
        return 0
    state = ckpt.load_engine_state(run.engine, path)
    if "features" in state:
        features.load_checkpoint_state(run.model, state["features"])
    run.data_stage, run.data_stage_start = state.get("data_stage", 0), state.get("data_stage_start", 0)
    if run.is_main:
        ckpt.truncate_metrics(run.out / "metrics.jsonl", state["step"])
        print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"]


def enter_data_stage(run: Run, stage: int, step: int) -> None:
    """Train on curriculum.data_stages[stage] (its training files, its validation) from `step` on, or on the run's
    own splits once every stage is done. The test split never changes."""
    stages = run.cfg.curriculum.data_stages
    if stage > len(stages):
        raise RuntimeError(f"data stage {stage} recorded in the checkpoint, but curriculum.data_stages has only "
                           f"{len(stages)} entries (resumed with a different config?)")
    run.data_stage, run.data_stage_start = stage, step
    run.splits = run.own_splits if stage == len(stages) else run.stage_splits[stage]
    if run.is_main and stages:
        what = "the run's own data" if stage == len(stages) else f"curriculum.data_stages.{stage}"
        print(f"step {step}: data stage {stage} ({what}): {len(run.splits.train)} training and "
              f"{len(run.splits.validation)} validation examples", flush=True)


def keep_best(run: Run, step: int, saved: Path | None, eval_out: dict, validation: list) -> None:
    """Point checkpoints/best at this step when its evaluation metric, measured on `validation`, beats the best
    so far on that same validation set (all ranks agree, and all have read best.json before rank 0 rewrites it)."""
    root = run.out / "checkpoints"
    split = data_lib.split_digest(validation)["content_sha256"]  # ids repeat across stages
    if any_rank(ckpt.is_better(eval_out["value"], ckpt.read_best(root), eval_out["metric"], split)):
        saved = saved or save(run, step)
        if run.is_main:
            ckpt.update_best(root, saved, eval_out["value"], eval_out["metric"], split)
        barrier()


# ================================================================================================================
# 3. the step: one optimizer step over grad_accum micro-batches


def loss_norms(run: Run, step: int, contracts: dict) -> dict[str, dict[str, float]]:
    """Per receiver: world * grad_accum / supervised rows in this step's whole global batch, for the K-token terms
    ("loss_norm") and for the answer-token-0 term ("loss_norm_first").

    Every rank computes it from the data order alone (no communication), so losses are token means over the
    global batch and the update does not depend on how it is split over ranks and micro-batches."""
    k = curriculum.k_at(run.cfg, step, run.model.curriculum_state)
    examples = [run.splits.train[i] for accum in range(run.grad_accum) for rank in range(run.world)
                for i in _indices(run, step, accum, rank)]
    scale = run.world * run.grad_accum
    norms = {}
    for name, contract in contracts.items():
        rows = sum(min(k, len(contract.answer_ids(ex.answers[0]))) for ex in examples)
        norms[name] = {"loss_norm": scale / max(1, rows), "loss_norm_first": scale / max(1, len(examples))}
    return norms


def _indices(run: Run, step: int, accum: int, rank: int) -> list[int]:
    return data_lib.micro_batch_indices(step, run.micro_batch, accum, run.grad_accum, rank, run.world,
                                        len(run.splits.train), run.cfg.data.seed)


def run_step(run: Run, step: int, contracts: dict) -> tuple[float, dict]:
    """Forward, backward and DeepSpeed's step for each micro-batch (the optimizer only moves at the last one).
    Returns the loss and its parts, averaged over micro-batches and all-reduced over ranks."""
    cfg = run.cfg
    norms = loss_norms(run, step, contracts)
    every = cfg.train.diagnostics_every
    diagnose = every > 0 and step % every == 0
    losses, parts_acc = [], {}
    for accum in range(run.grad_accum):
        batch = data_lib.collate([run.splits.train[i] for i in _indices(run, step, accum, run.rank)], contracts,
                                 cfg.data.max_prompt_bytes, cfg.losses.k_tokens, run.stats)
        for name, norm in norms.items():
            batch["receivers"][name].update(norm)
        batch = data_lib.to_device(batch, run.engine.device)
        where = f"step {step + 1}, micro-batch {accum + 1}/{run.grad_accum}"
        last = accum == run.grad_accum - 1  # DeepSpeed's step moves the optimizer at this micro-batch only

        def forward():
            run.faults.fire("forward", step)
            return run.engine(batch, step, diagnose=diagnose)

        def step_optimizer():
            if last:
                run.faults.fire("step", step)
            run.engine.step()

        # A ZeRO <= 2 forward holds no collective: all ranks agree after it whether any ran out of memory, before
        # any backward collective (handle_oom). A ZeRO-3 forward gathers parameters and every backward and optimizer
        # step reduces gradients: an OOM there is one rank's alone, and that rank leaves at once (_alone).
        out = faults.forward_agreed(forward, where) if run.zero <= 2 else _alone(run, forward, where)
        loss = run.faults.poison(out["loss"], step)
        parts = out["parts"]
        if not torch.isfinite(loss.detach()).all():
            run.loss_bad = True  # still backpropagated, so every rank runs the same collectives; the guard skips
        _alone(run, lambda: run.engine.backward(run.faults.arm_backward(loss, step)), where + ", backward")
        _alone(run, step_optimizer, where + ", optimizer step")
        losses.append(float(loss.detach()))
        for key, value in parts.items():
            parts_acc.setdefault(key, []).append(value)
    keys = sorted(parts_acc)
    local = [sum(losses) / len(losses)] + [sum(parts_acc[k]) / len(parts_acc[k]) for k in keys]
    reduced = all_reduce_mean(local)
    return reduced[0], dict(zip(keys, reduced[1:]))


def _alone(run: Run, fn, where: str):
    """fn() where the ranks cannot agree on an out-of-memory error (it holds collectives a peer may be inside):
    on one, this rank persists the halved layout and raises Relaunch(75) at once, without any collective."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        pass  # leave the except block first, so the error's frames (and their tensors) are gone
    micro, accum = faults.halved_layout(run.micro_batch, run.grad_accum, where)
    raise faults.leave_for_relaunch(run.out, run.rank, micro, accum, run.oom_events + 1, run.faults.oom_fired, where)


# ================================================================================================================
# 4. the loop: curriculum stages, steps, OOM back-off, logging, periodic evaluation, checkpoints, requeue


def train(run: Run) -> None:
    cfg, tr = run.cfg, run.cfg.train
    contracts = {name: r.contract for name, r in run.model.receivers.items()}
    monitor = Monitor(run.out, tr.max_steps, run.start_step, tr.log_every, run.is_main, tr.tensorboard)
    step, bad_streak = run.start_step, 0
    began = time.perf_counter()  # metrics.jsonl "train_s": seconds of this process's loop, evaluations included
    if cfg.eval.every and cfg.eval.at_start and step == 0:  # the untrained baseline every later eval is read against
        monitor.log({"step": 0, **periodic_eval(run.model, run.splits.validation, 0, synced=run.synced)["log"]})
    while step < tr.max_steps:
        # Staged latent length: the weights move to the stage's model before its first step.
        if cfg.curriculum.m_stages:
            stage = curriculum.stage_at(cfg, step)
            if run.model.cfg.encoder.m_shared != cfg.curriculum.m_stages[stage]:
                hand_off(run, step, stage)
        skipped_before = run.engine.skipped_steps
        started = time.perf_counter()
        try:
            loss, parts = run_step(run, step, contracts)
        except faults.StepOOM as err:
            handle_oom(run, str(err))
            continue  # the same global batch again, now in smaller micro-batches
        curriculum.after_step(run.model, parts)  # parts are all-reduced: every rank takes the same decision
        skipped = run.engine.skipped_steps > skipped_before
        bad_streak = bad_streak + 1 if skipped else 0
        row = _step_row(run, step, loss, parts, skipped, time.perf_counter() - started)
        eval_out = None
        if cfg.eval.every and (step + 1) % cfg.eval.every == 0:
            eval_out = periodic_eval(run.model, run.splits.validation, step + 1, synced=run.synced)
            row.update(eval_out["log"])
        row["train_s"] = time.perf_counter() - began
        monitor.log(row)
        monitor.progress(step + 1, row)
        step += 1

        # Too many skipped steps in a row: stop with the last good weights on disk.
        if bad_streak >= tr.max_consecutive_bad_steps:
            save(run, step)
            raise faults.NonFiniteError(
                f"{bad_streak} consecutive optimizer steps (up to step {step}) had a non-finite loss or gradient and "
                f"were skipped; stopping (train.max_consecutive_bad_steps={tr.max_consecutive_bad_steps}). The last "
                f"good weights are in checkpoints/step_{step}.")
        requeue = faults.requeue_requested()
        # The data stage is decided on this step's validation (or a step cap) BEFORE the save, so the checkpoint
        # of this step records the stage the next step trains in; all ranks move together if any rank says so.
        validation = run.splits.validation  # what eval_out was measured on
        stage = curriculum.data_stage_after(cfg, run.data_stage, run.data_stage_start, step,
                                            eval_out["value"] if eval_out is not None else None)
        switched = any_rank(stage != run.data_stage) if cfg.curriculum.data_stages else False
        if switched:
            enter_data_stage(run, run.data_stage + 1, step)
        due = step % tr.save_every == 0 or step == tr.max_steps or requeue or switched
        saved = save(run, step) if due else None
        if eval_out is not None:
            keep_best(run, step, saved, eval_out, validation)
        if not switched and eval_out is not None and run.data_stage == len(cfg.curriculum.data_stages):
            if _target_reached(run.cfg, eval_out["value"]):  # decided on validation, identical on every rank
                if saved is None:
                    save(run, step)
                if run.is_main:
                    print(f"step {step}: validation {eval_out['metric']} = {eval_out['value']:.2f} reached "
                          f"train.stop_at_metric={tr.stop_at_metric}; stopping", flush=True)
                break
        if requeue and step < tr.max_steps:
            if run.is_main:
                print(f"SIGUSR1: checkpointed step {step}; exiting with {faults.REQUEUE_EXIT_CODE} to be requeued",
                      flush=True)
            barrier()
            raise faults.Relaunch(faults.REQUEUE_EXIT_CODE, f"requeue after step {step}")
    monitor.close()
    stages = cfg.curriculum.data_stages
    if run.is_main and run.data_stage < len(stages):
        print(f"note: training ended inside curriculum.data_stages.{run.data_stage} (since step "
              f"{run.data_stage_start}): it never reached the run's own training data, and checkpoints/best was "
              f"chosen on that stage's validation set", flush=True)


def _target_reached(cfg: config_lib.Config, value: float) -> bool:
    """train.stop_at_metric: the periodic validation metric reached its target (at or below it for NLL)."""
    target = cfg.train.stop_at_metric
    if not target or value is None or math.isnan(value):
        return False
    return value <= target if ckpt.lower_is_better(cfg.eval.best_metric) else value >= target


def _step_row(run: Run, step: int, loss: float, parts: dict, skipped: bool, elapsed: float) -> dict:
    """One metrics.jsonl row: the step's losses, schedule, layout and throughput (non-finite values as null)."""
    norm = run.engine.get_global_grad_norm()
    global_batch = run.cfg.train.global_batch(run.world)
    return {"step": step + 1, "loss": finite_or_none(loss), **{k: finite_or_none(v) for k, v in parts.items()},
            "skipped": skipped, "skipped_steps": run.engine.skipped_steps, "lr": run.engine.get_lr()[0],
            "grad_norm": None if norm is None else finite_or_none(float(norm)), "micro_batch": run.micro_batch,
            "grad_accum": run.grad_accum, "global_batch": global_batch, "oom_events": run.oom_events,
            "examples_per_s": global_batch / elapsed,
            **({"data_stage": run.data_stage} if run.cfg.curriculum.data_stages else {})}


def handoff_model(model: LatentWire, stage: int) -> LatentWire:
    """The LatentWire of curriculum stage `stage`, over the same receivers, starting from `model`'s trained weights
    (shared-slot tables resized by curriculum.handoff_state); teachers and curriculum state carried over."""
    new_cfg = curriculum.stage_config(model.cfg, stage)
    state = curriculum.handoff_state(model.trainable_state_dict(), model.cfg.encoder.m_shared,
                                     new_cfg.encoder.m_shared)
    new = LatentWire(new_cfg, list(model.receivers.values()))
    expected = set(new.trainable_state_dict())
    if set(state) != expected:
        raise ValueError(f"stage hand-off: trainable keys differ (missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]})")
    new.load_state_dict(state, strict=False)
    new.curriculum_state = dict(model.curriculum_state)
    new.teachers = model.teachers
    return new


def hand_off(run: Run, step: int, stage: int) -> None:
    """Move to the next latent-length stage: the new stage's model, optimizer and scheduler rebuilt, then a
    checkpoint of the stage's start."""
    old = run.model
    run.model = handoff_model(old, stage)
    run.engine = build_engine(run.model, run.ds_config, run.cfg, curriculum.stage_start(run.cfg, stage))
    _guard_steps(run)
    if run.is_main:
        print(f"step {step}: latent stage {stage}, m_shared {old.cfg.encoder.m_shared} -> "
              f"{run.model.cfg.encoder.m_shared}", flush=True)
    save(run, step)


def _resume_stage(cfg: config_lib.Config, out: Path, ds_config: dict) -> int:
    """The latent-length stage the run resumes in (0 for a new run or without staged M)."""
    if not cfg.curriculum.m_stages:
        return 0
    if zero_stage(ds_config) == 3:
        raise config_lib.ConfigError("curriculum.m_stages: the staged-M hand-off rebuilds the engine in process, "
                                     "which ZeRO-3 (partitioned receivers) does not support; use ZeRO-2 or one stage")
    path = ckpt.find_resumable(out, log=lambda *_: None)
    if path is None:
        return 0
    m_saved = json.loads((path / "config.json").read_text())["encoder"]["m_shared"]
    return curriculum.resume_stage(cfg, ckpt.read_trainer_state(path)["step"], m_saved, where=str(path))


def handle_oom(run: Run, where: str) -> None:
    """Back off after an OOM all ranks agreed on (a ZeRO <= 2 forward): in process the first time, when nothing was
    accumulated yet; otherwise every rank persists the same smaller micro-batch and raises Relaunch(75) at once,
    without a barrier, for the supervisor to start the run again."""
    run.oom_events += 1
    run.oom_this_process += 1
    faults.free_memory()
    new_micro, new_accum = faults.halved_layout(run.micro_batch, run.grad_accum, where)
    in_process = faults.back_off_in_process(run.zero, run.oom_this_process, where)
    fired = faults.agreed_injected_step(run.faults.oom_fired)  # every rank is here: the collective is safe
    if run.is_main:
        print(f"out of memory at {where}: micro-batch {run.micro_batch} -> {new_micro}, gradient accumulation "
              f"{run.grad_accum} -> {new_accum}, global batch kept at {run.cfg.train.global_batch(run.world)}"
              + ("" if in_process else "; exiting for a relaunch from the last checkpoint"), flush=True)
    old_accum, run.micro_batch, run.grad_accum = run.grad_accum, new_micro, new_accum
    if not in_process:
        raise faults.leave_for_relaunch(run.out, run.rank, new_micro, new_accum, run.oom_events, fired, where)
    if run.is_main:
        faults.write_run_state(run.out, new_micro, new_accum, run.oom_events, fired)
    run.engine.set_train_micro_batch_size(new_micro)
    run.engine.set_train_batch_size(new_micro * new_accum * run.world)
    # DeepSpeed places its accumulation boundary by counting micro-batches, (micro_steps + 1) % accumulation:
    # recount the steps taken in the new layout, or the optimizer would step after the first new micro-batch.
    run.engine.micro_steps = run.engine.micro_steps // old_accum * new_accum


# ================================================================================================================
# 5. the end: evaluate the in-memory model


def evaluate_run(run: Run) -> dict | None:
    """Evaluate the in-memory model on the TEST split, once, at the end; every rank runs the same work, rank 0
    writes."""
    # The zstd dictionary of the text baselines is trained on the run's OWN training prompts, even when the run
    # ends inside a data stage.
    result, rows = evaluate(run.model, run.splits.test, synced=run.synced, features=features.active(run.cfg),
                            split="test", train_examples=run.own_splits.train)
    if run.is_main:
        write_outputs(result, rows, run.out / "eval", run.out / "metrics.jsonl")
        print(format_table(result), flush=True)
    barrier()
    return result


def main(cfg: config_lib.Config, out: Path, ds_path: str | None, allow_config_change: bool = False) -> Run:
    run = setup(cfg, out, ds_path, allow_config_change)
    train(run)
    if cfg.eval.at_end:
        evaluate_run(run)
    return run
