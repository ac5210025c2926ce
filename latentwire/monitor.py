"""What a training run reports as it goes, on rank 0: metrics.jsonl, TensorBoard event files and progress.

    tensorboard --logdir runs/demo          # losses, learning rate, grad norms, validation EM/F1, diagnostics

- `metrics.jsonl` gets one JSON object per optimizer step (and the step-0 validation row), as before.
- TensorBoard (`RUN/tensorboard/`, written through torch.utils.tensorboard) gets every numeric value of those rows
  under its own key as the tag: `loss`, `lr`, `grad_norm`, `ce/<receiver>`, `kd/<receiver>`,
  `eval/latent_em/<receiver>`, `diversity/<receiver>`, ... A resumed run purges the events after its checkpoint.
- Progress: a tqdm bar on a terminal; where output goes to a file (slurm logs, CI, nohup) one plain line every
  `train.log_every` steps instead of thousands of carriage-return frames.

`quiet_known_warnings()` filters, by message and category, the deprecation warnings our pinned dependencies
print on every run (never all warnings); the entry points call it first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

# (category, message regex) of dependency warnings that say nothing about the user's run.
KNOWN_WARNINGS = [
    (FutureWarning, r".*torch\.distributed.*"),
    (FutureWarning, r".*`torch\.cuda\.amp\..*` is deprecated.*"),
    (UserWarning, r".*The given NumPy array is not writable.*"),
    (UserWarning, r".*TypedStorage is deprecated.*"),
    (DeprecationWarning, r".*pkg_resources is deprecated.*"),
    (UserWarning, r".*Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`.*"),
    # Our non-finite step guard wraps optimizer.step after the scheduler exists (latentwire/faults.py): intended.
    (UserWarning, r".*Seems like `optimizer\.step\(\)` has been overridden after learning rate scheduler.*"),
]


def quiet_known_warnings() -> None:
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    quiet_dependency_bars()


def quiet_dependency_bars() -> None:
    """Where stderr is a file (slurm logs, CI, nohup), transformers' "Loading weights" bars (one per model and
    rank) become nothing instead of runs of carriage-return frames; on a terminal they stay. A user's own
    HF_HUB_DISABLE_PROGRESS_BARS is left as it is."""
    if sys.stderr.isatty() or "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub / transformers are imported
    if "transformers" in sys.modules:  # already imported: its switch was set then
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class Monitor:
    """metrics.jsonl, TensorBoard and progress for one run; a no-op on ranks other than 0."""

    def __init__(self, out: Path, total_steps: int, start_step: int, log_every: int, enabled: bool,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.total, self.log_every = total_steps, max(1, log_every)
        self.bar = self.writer = None
        self.started, self.start_step = time.perf_counter(), start_step
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step or None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, row: dict) -> None:
        """One metrics row (with "step"): to metrics.jsonl, and its finite numbers to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def progress(self, step: int, row: dict) -> None:
        """After optimizer step `step` (1-based): the bar, or a plain line every log_every steps."""
        if not self.enabled:
            return
        loss = "skipped" if row.get("skipped") else f"{row['loss']:.3f}" if row.get("loss") is not None else "nan"
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_every == 0:
                self.bar.set_postfix(loss=loss, lr=f"{row['lr']:.2e}")
            return
        if step % self.log_every == 0 or step == self.total:
            rate = (step - self.start_step) / max(1e-9, time.perf_counter() - self.started)
            evals = " ".join(f"{k}={v:.1f}" for k, v in row.items() if k.startswith("eval/") and k.count("/") == 1)
            print(f"step {step}/{self.total} loss {loss} lr {row['lr']:.2e} {rate:.2f} steps/s {evals}".rstrip(),
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def finite_or_none(value):
    """A float for metrics.jsonl: itself when finite, else None (JSON null), never NaN or inf."""
    return value if isinstance(value, float) and math.isfinite(value) else None


def environment() -> dict:
    """What run_info.json records about where a run ran: device, versions and the git commit."""
    import deepspeed
    import torch
    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return {"device": "cuda" if torch.cuda.is_available() else "cpu",
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
            "git_sha": sha}
