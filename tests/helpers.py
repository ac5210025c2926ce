"""Helpers shared by several test files (fixtures live in conftest.py): kernel-test tolerances and inputs, a
plain AdamW loop over one batch, and a checkpoint written through the trainer's own `checkpoint.commit_checkpoint`.

Imported as `from tests.helpers import ...`; the Triton child process (tests/test_kernels_triton.py run as a
script) puts the repository root on sys.path first.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# Max |error| <= REL_TOL[dtype] * max |expected|: fp32 statistics; bf16 outputs and gradients are rounded to
# 8 bits when cast back to the input dtype.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype, what=""):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    scale = max(expected.abs().max().item(), 1e-6) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def grads(loss, *tensors, upstream=None):
    """Gradients of `loss` with respect to those of `tensors` that require them."""
    return torch.autograd.grad(loss, [t for t in tensors if t.requires_grad], grad_outputs=upstream)


def lm_head_inputs(n_rows, vocab, width, dtype, weight_grad=False, seed=0, device="cpu"):
    """hidden (N, H) and weight (V, H) in `dtype` on `device`, plus float64 CPU leaf copies of the same (rounded)
    values."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, width, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, width, generator=gen) * width ** -0.5 * 3).to(device=device, dtype=dtype)
    hidden64, weight64 = hidden.double().cpu().requires_grad_(), weight.double().cpu().requires_grad_(weight_grad)
    return hidden.requires_grad_(), weight.requires_grad_(weight_grad), hidden64, weight64


def train_steps(model, batch: dict, steps: int, lr: float, first_step: int = 0) -> list[float]:
    """Plain AdamW over the trainable parameters on one fixed batch (no DeepSpeed); returns the losses."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    for step in range(first_step, first_step + steps):
        loss = model(batch, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def write_checkpoint(model, run_dir: Path, step: int = 1) -> Path:
    """RUN/checkpoints/step_<step>/ (and `latest`) for `model` through `checkpoint.commit_checkpoint`, as the
    trainer writes it, without DeepSpeed's optimizer state (evaluation never reads it)."""
    from latentwire import checkpoint as ckpt

    root = Path(run_dir) / "checkpoints"
    ckpt.prepare_staging(root, step)
    trainable = {k: v.detach().contiguous() for k, v in model.trainable_state_dict().items()}
    contracts = {name: r.contract.to_dict() for name, r in model.receivers.items()}
    return ckpt.commit_checkpoint(root, step, trainable, {"step": step}, model.cfg, contracts, keep_last=3)


# A deliberately small wire (16 slots x 8 dims): the int8 payload (148 B) is shorter than the prompts, so the
# byte_budget path really cuts them.
EVAL_OVERRIDES = ["encoder.n_layers=1", "encoder.d_z=8", "data.max_prompt_bytes=256", "eval.max_new_tokens=3",
                  "eval.batch_size=2", "eval.latency_repeats=1", "eval.max_examples=3"]


def make_checkpoint(root, receivers, overrides=None, step=1):
    """RUN/checkpoints/step_<step>/ as the trainer writes it, from an untrained model -> (dir, cfg, model)."""
    from latentwire.config import load_config
    from latentwire.model import LatentWire

    cfg = load_config(ROOT / "configs" / "tiny.json", EVAL_OVERRIDES + (overrides or []))
    torch.manual_seed(cfg.train.seed)
    model = LatentWire(cfg, receivers)
    return write_checkpoint(model, root, step), cfg, model


def eval_examples():
    """Two SQuAD examples and one relabelled as NQ, so the per-dataset breakdown has two sources."""
    from latentwire import data as D

    squad = D.read_file(str(D.EMBEDDED_SQUAD))
    return [squad[0], squad[40], replace(squad[80], source="nq", id="nq-0")]
