"""A run directory's checkpoints: atomic save, sha256 manifest, verify, find, prune, `latest` / `best`, load.

    RUN/checkpoints/step_<N>/   config.json, contract.json, trainer_state.json, trainable.safetensors,
                                ds/ (DeepSpeed's optimizer and scheduler state), manifest.json (sha256 of each file)
    RUN/checkpoints/latest      symlink to the newest complete step directory (moved last, atomically)
    RUN/checkpoints/best        symlink to the step directory with the best validation metric; best.json beside it

A step directory is written under a temporary name, fsynced, then renamed, so a crash at any moment leaves either
the old or the new checkpoint and never a half-written one; `find_resumable` verifies every file against the
manifest and falls back to the newest older checkpoint that verifies. DeepSpeed's own state files are loaded with
`weights_only=True` and an allowlist of its three state types (`restrict_checkpoint_loads`).

Every function takes explicit arguments (paths, modules, states); the trainer (latentwire/train.py), evaluation
(launch/eval.py) and the inference API call them. Tests: `python -m pytest tests/test_reliability.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from latentwire import config as config_lib
from latentwire.config import parse_metric_name

TRAINABLE_FILE = "trainable.safetensors"
MANIFEST_FILE = "manifest.json"
TRAINER_STATE_FILE = "trainer_state.json"
LATEST_LINK = "latest"
BEST_LINK = "best"
BEST_FILE = "best.json"
DS_TAG = "ds"  # DeepSpeed's sub-directory inside a step directory


def sha256_file(path: Path) -> str:
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


def _point_link(root: Path, name: str, target: Path) -> None:
    """Replace the symlink root/name with one to `target` (a sibling) atomically: a temporary link renamed over."""
    tmp = root / f".{name}_tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, root / name)


# ----------------------------------------------------------------------------------------------------------------
# writing


def staging_dir(root: Path, step: int) -> Path:
    """The temporary directory step `step` is written into (rank 0 creates it empty; every rank writes its
    DeepSpeed shard there); `commit_checkpoint` turns it into step_<N>."""
    return root / f".tmp_step_{step}"


def prepare_staging(root: Path, step: int) -> Path:
    tmp = staging_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], trainer_state: dict,
                      cfg: config_lib.Config, contracts: dict, keep_last: int) -> Path:
    """Rank 0: add the trainable weights, trainer state, config and prefix contracts to the staging directory
    (which already holds DeepSpeed's state under ds/), write the manifest, fsync, rename to step_<N>, move
    `latest`, prune. Returns the step directory."""
    from safetensors.torch import save_file

    tmp, final = staging_dir(root, step), root / f"step_{step}"
    save_file(trainable, str(tmp / TRAINABLE_FILE))
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    config_lib.save_config(cfg, tmp / "config.json")
    (tmp / "contract.json").write_text(json.dumps(contracts, indent=2) + "\n")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_link(root, LATEST_LINK, final)
    prune(root, keep_last)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints, and always the one checkpoints/best points at."""
    best = best_checkpoint(root)
    for path in complete_checkpoints(root)[keep:]:
        if path.resolve() != best:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# finding and verifying


def verify_checkpoint(path: Path) -> None:
    """Check every file against the manifest; raise RuntimeError naming the first bad file."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RuntimeError(f"checkpoint {path} has no {MANIFEST_FILE}: incomplete")
    for rel, digest in json.loads(manifest_path.read_text()).items():
        f = path / rel
        if not f.is_file():
            raise RuntimeError(f"checkpoint {path}: file {rel} listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise RuntimeError(f"checkpoint {path}: file {rel} does not match its sha256 (corrupt)")


def complete_checkpoints(root: Path) -> list[Path]:
    """step_<N> directories, newest first (temporary .tmp_step_* directories are never candidates)."""
    steps = [(int(p.name[5:]), p) for p in root.glob("step_*") if p.name[5:].isdigit()]
    return [p for _, p in sorted(steps, reverse=True)]


def find_resumable(out: Path, log=print) -> Path | None:
    """The checkpoint of run directory `out` to resume from: `latest` if it verifies, else the newest older one
    that does. A corrupt or incomplete checkpoint is reported by name and skipped, never loaded."""
    root = out / "checkpoints"
    latest = root / LATEST_LINK
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


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE_FILE).read_text())


def truncate_metrics(path: Path, step: int) -> None:
    """Rows of metrics.jsonl written after the checkpoint we resume from are superseded by the rerun."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------------
# the best checkpoint (chosen on validation)


def lower_is_better(metric: str) -> bool:
    """NLL falls as the model improves; EM, F1 and first-token accuracy rise."""
    return parse_metric_name(metric, None)[1] == "nll"


def read_best(root: str | Path) -> dict | None:
    """The record of `checkpoints/best` ({"metric", "value", "step", "checkpoint"}), or None."""
    path = Path(root) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_better(value: float, best: dict | None, metric: str, split: str | None = None) -> bool:
    """Whether `value` of `metric` beats the recorded best. A record of another metric, or one measured on another
    validation set (`split`: its digest, e.g. after a data-curriculum stage changed it), does not count."""
    if value is None or math.isnan(value):
        return False
    if best is None or best.get("metric") != metric or best.get("split") != split:
        return True
    return value < best["value"] if lower_is_better(metric) else value > best["value"]


def update_best(root: str | Path, step_dir: str | Path, value: float, metric: str, split: str | None = None) -> bool:
    """Point `checkpoints/best` at `step_dir` if `value` beats the recorded best; returns whether it moved.

    Rank 0 only. Like `latest`, the link is replaced atomically, and `best.json` records metric, value and step
    next to it, so a resumed run keeps comparing against its peak."""
    root, step_dir = Path(root), Path(step_dir)
    if not step_dir.is_dir() or step_dir.resolve().parent != root.resolve():
        raise FileNotFoundError(f"best checkpoint candidate {step_dir} is not a directory inside {root}")
    if not is_better(value, read_best(root), metric, split):
        return False
    state = step_dir / TRAINER_STATE_FILE
    record = {"metric": metric, "value": value, "checkpoint": step_dir.name, "split": split,
              "step": json.loads(state.read_text())["step"] if state.is_file() else None}
    tmp = root / f".{BEST_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, root / BEST_FILE)
    _point_link(root, BEST_LINK, step_dir)
    return True


def best_checkpoint(root: str | Path) -> Path | None:
    """The step directory `checkpoints/best` points to (pruning must keep it), or None."""
    link = Path(root) / BEST_LINK
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


# ----------------------------------------------------------------------------------------------------------------
# loading


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


def load_engine_state(engine, path: Path) -> dict:
    """Restore engine weights, optimizer and scheduler from step directory `path`; returns its trainer state."""
    engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    return read_trainer_state(path)


def default_device() -> torch.device:
    """Where evaluation runs: this process's GPU when there is one (latency is then synchronized, see
    latentwire/eval.py), the CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_checkpoint_model(checkpoint: str | Path, overrides: list[str] | None = None,
                          device: str | torch.device | None = None):
    """Rebuild config, receivers and trainable weights from a checkpoint directory alone -> (cfg, model), the model
    on `device` (default: left on the CPU, where it is built; launch/eval.py passes `default_device()`)."""
    from safetensors.torch import load_file

    from latentwire.model import LatentWire
    from latentwire.receivers import Receiver

    path = Path(checkpoint).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    verify_checkpoint(path)
    cfg = config_lib.load_config(path / "config.json", overrides)
    receivers = [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]
    saved_contracts = json.loads((path / "contract.json").read_text())
    for r in receivers:
        if saved_contracts.get(r.cfg.name) != r.contract.to_dict():
            raise ValueError(f"receiver {r.cfg.name!r}: the prefix contract saved in {path} differs from the one "
                             f"rebuilt from {r.cfg.path!r} (different tokenizer or anchor)")
    torch.manual_seed(cfg.train.seed)
    model = LatentWire(cfg, receivers)
    state = load_file(str(path / TRAINABLE_FILE))
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
        raise ValueError(f"{path / TRAINABLE_FILE}: keys differ from the model's trainable state "
                         f"(missing {missing}, unexpected {unexpected})")
    model.load_state_dict(state, strict=False)
    model.eval()
    if device is not None:
        model.to(device)
    return cfg, model
