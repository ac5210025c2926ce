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
from latentwire.distributed import (all_reduce_mean, barrier, build_ds_config, init_distributed, read_ds_config,
                                    zero_stage)
from latentwire.model import LatentWire
from latentwire.receivers import Receiver, gathered, is_partitioned

TRAINABLE_FILE = "trainable.safetensors"
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------------------------
# setup


def lr_lambda(cfg: config_lib.Config):
    """Linear warm-up then cosine decay to min_lr_ratio * lr, as a multiplier of the peak lr."""
    import math

    tr = cfg.train

    def fn(step: int) -> float:
        if step < tr.warmup_steps:
            return (step + 1) / (tr.warmup_steps + 1)
        span = max(1, tr.max_steps - tr.warmup_steps)
        progress = min(1.0, (step - tr.warmup_steps) / span)
        return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


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


def _resolved_config_matches(out: Path, cfg: config_lib.Config) -> None:
    saved = out / "config.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text())
    changed = config_lib.diff_configs(old, config_lib.to_dict(cfg))
    # Fields that may legitimately change on resume (more steps, a smaller micro-batch after OOM).
    allowed = ("train.max_steps", "train.micro_batch", "train.grad_accum", "eval.")
    blocking = [c for c in changed if not c.startswith(allowed)]
    if blocking:
        raise config_lib.ConfigError("the config differs from the one this run directory was started with:\n  "
                                     + "\n  ".join(blocking) + "\nuse a new --output_dir")


def setup(cfg: config_lib.Config, out: Path, ds_path: str | None) -> Run:
    rank, world = init_distributed()
    torch.manual_seed(cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    _resolved_config_matches(out, cfg)
    train_examples, eval_examples = data_lib.load_splits(cfg.data)
    cuda = torch.cuda.is_available()
    receivers_h = _max_hidden_size(cfg)
    ds_config = build_ds_config(read_ds_config(ds_path), cfg.train.micro_batch, cfg.train.grad_accum, world,
                                cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip, receivers_h, cuda)
    receivers = load_receivers(cfg, ds_config)
    torch.manual_seed(cfg.train.seed)  # trainable init does not depend on how receivers were loaded
    model = LatentWire(cfg, receivers)
    if cuda:
        model.encoder.cuda()
        model.adapters.cuda()

    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(),
                                           config=ds_config, lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(cfg)))
    run = Run(cfg, out, rank, world, ds_config, engine, model, train_examples, eval_examples)
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
        "micro_batch": run.cfg.train.micro_batch, "grad_accum": run.cfg.train.grad_accum,
        "global_batch": run.cfg.train.micro_batch * run.cfg.train.grad_accum * run.world,
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
    params = [p for n, p in run.model.named_parameters() if not n.startswith("receivers.")]
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
        trainer_state = {"step": step, "micro_batch": run.cfg.train.micro_batch,
                         "grad_accum": run.cfg.train.grad_accum, "world_size": run.world,
                         "examples_seen": step * run.cfg.train.micro_batch * run.cfg.train.grad_accum * run.world}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        config_lib.save_config(run.cfg, tmp / "config.json")
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
    steps = sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name.split("_")[1].isdigit())
    for _, path in steps[:-keep]:
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


def load_latest(run: Run) -> int:
    """Resume from checkpoints/latest if it exists: engine state, optimizer, scheduler. Returns the step."""
    latest = run.out / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    path = latest.resolve()
    verify_checkpoint(path)
    run.engine.load_checkpoint(str(path), tag="ds", load_module_strict=False, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    step = json.loads((path / "trainer_state.json").read_text())["step"]
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


def train(run: Run) -> None:
    cfg = run.cfg
    tr = cfg.train
    contracts = {name: r.contract for name, r in run.model.receivers.items()}
    device = run.engine.device
    n = len(run.train_examples)
    global_batch = tr.micro_batch * tr.grad_accum * run.world
    progress = None
    if run.is_main:
        from tqdm import tqdm

        progress = tqdm(total=tr.max_steps, initial=run.start_step, desc="train", dynamic_ncols=True)
    metrics_path = run.out / "metrics.jsonl"
    for step in range(run.start_step, tr.max_steps):
        started = time.perf_counter()
        losses_, parts_acc = [], {}
        for accum in range(tr.grad_accum):
            idx = data_lib.micro_batch_indices(step, tr.micro_batch, accum, tr.grad_accum, run.rank, run.world, n,
                                               cfg.data.seed)
            batch = data_lib.collate([run.train_examples[i] for i in idx], contracts, cfg.data.max_prompt_bytes,
                                     cfg.losses.k_tokens, run.stats)
            out = run.engine(_to_device(batch, device), step)
            run.engine.backward(out["loss"])
            run.engine.step()
            losses_.append(float(out["loss"].detach()))
            for k, v in out["parts"].items():
                parts_acc.setdefault(k, []).append(v)
        keys = sorted(parts_acc)
        local = [sum(losses_) / len(losses_)] + [sum(parts_acc[k]) / len(parts_acc[k]) for k in keys]
        reduced = all_reduce_mean(local)
        elapsed = time.perf_counter() - started
        row = {"step": step + 1, "loss": reduced[0], **dict(zip(keys, reduced[1:])),
               "lr": run.engine.get_lr()[0], "grad_norm": _grad_norm(run.engine), "micro_batch": tr.micro_batch,
               "grad_accum": tr.grad_accum, "global_batch": global_batch, "oom_events": 0,
               "examples_per_s": global_batch / elapsed}
        if run.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            progress.update(1)
            if (step + 1) % tr.log_every == 0:
                progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
        if (step + 1) % tr.save_every == 0 or step + 1 == tr.max_steps:
            save_checkpoint(run, step + 1)
    if progress is not None:
        progress.close()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def evaluate_run(run: Run) -> dict | None:
    """Evaluate the in-memory model on the held-out split; every rank runs the same work, rank 0 writes."""
    from latentwire.eval import evaluate, format_table

    synced = run.world > 1 and zero_stage(run.ds_config) == 3
    result, rows = evaluate(run.model, run.eval_examples, synced=synced, features=active_features(run.cfg))
    if run.is_main:
        out = run.out / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        with open(out / "predictions.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        print(format_table(result), flush=True)
    barrier()
    return result


def active_features(cfg: config_lib.Config) -> list[str]:
    return [name for name, on in config_lib.to_dict(cfg.features).items() if on is True]


def main(cfg: config_lib.Config, out: Path, ds_path: str | None) -> Run:
    run = setup(cfg, out, ds_path)
    train(run)
    if cfg.eval.at_end:
        evaluate_run(run)
    return run
