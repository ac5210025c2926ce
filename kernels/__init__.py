"""LatentWire's loss kernels: RMS calibration, K-token cross-entropy and KD softmax loss, each fused with what
surrounds it (the LM head for the two losses) and written as Triton kernels with a PyTorch reference.

    kernels.rms_calibrate(x, target_rms, eps=1e-6)                               x (B, M, D) -> (B, M, D)
    kernels.k_token_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean")
    kernels.kd_softmax_loss(hidden, weight, teacher_logits, temperature=1.0, teacher_weights=None, mask=None)
    kernels.kd_topk_loss(hidden, weight, topk_ids, topk_logprobs, temperature=1.0, mask=None)   (PyTorch only)
    kernels.lm_head_logits(hidden, weight) -> (N, V) fp32; kernels.lm_head_argmax(hidden, weight) -> (N,)
        (a few rows of full logits, e.g. teacher logits at K positions, without an fp32 copy of a bf16 head)

hidden (N, H) are the student's final hidden states, weight (V, H) its LM head, teacher_logits (T, N, V).
Which implementation runs is decided per call from the first tensor argument:
  * CUDA tensors take the Triton kernels (the reference if triton is missing);
  * CPU tensors take the PyTorch reference, unless TRITON_INTERPRET=1, then the Triton kernels (interpreted);
  * LATENTWIRE_KERNELS=triton | reference in the environment forces one of the two.
Both paths walk the vocabulary in chunks, so neither ever holds the (N, V) logits. `last_backend(op)` says what
the latest call of an op ran; `triton_launch_counts()` counts kernel launches. `import kernels` works without
triton installed.

Tests:      pytest tests/test_kernels_reference.py tests/test_kernels_triton.py   (GPU: pytest -m gpu)
Benchmarks: python -m kernels.bench --op {rms_calibrate,k_token_ce,kd_softmax} [--device cpu|cuda] [--csv PATH]
"""

from __future__ import annotations

import os

import torch

from kernels._lm_head import lm_head_argmax, lm_head_logits
from kernels._triton_compat import HAS_TRITON, LAUNCH_COUNTS, interpreter_enabled
from kernels.k_token_ce import KTokenCEFunction, k_token_ce_naive, k_token_ce_reference
from kernels.kd_softmax import (KDSoftmaxFunction, KDTopKFunction, kd_softmax_naive, kd_softmax_reference,
                                kd_topk_naive, kd_topk_reference)
from kernels.rms_calibrate import RMSCalibrateFunction, rms_calibrate_naive, rms_calibrate_reference

BACKENDS = ("triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_last_backend: dict[str, str] = {}


def triton_available() -> bool:
    """True when triton imported (it can still be unusable on CPU tensors without TRITON_INTERPRET=1)."""
    return HAS_TRITON


def select_backend(tensor: torch.Tensor) -> str:
    """'triton' or 'reference' for an op whose main input is `tensor` (rules in the module docstring)."""
    forced = os.environ.get("LATENTWIRE_KERNELS", "").strip().lower()
    if forced not in ("",) + BACKENDS:
        raise ValueError(f"LATENTWIRE_KERNELS must be one of {BACKENDS} or unset, got {forced!r}")
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError("LATENTWIRE_KERNELS=triton but triton is not installed")
        if not tensor.is_cuda and not interpreter_enabled():
            raise RuntimeError("LATENTWIRE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
        if tensor.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the Triton kernels take {_TRITON_DTYPES}, got {tensor.dtype}; use the reference")
        return "triton"
    if not HAS_TRITON or tensor.dtype not in _TRITON_DTYPES:
        return "reference"
    if tensor.is_cuda or interpreter_enabled():
        return "triton"
    return "reference"


def last_backend(op: str) -> str | None:
    """Backend of the latest call of `op` in this process: 'triton', 'reference' or None (never called)."""
    return _last_backend.get(op)


def triton_launch_counts() -> dict[str, int]:
    """Kernel function name -> launches so far in this process."""
    return dict(LAUNCH_COUNTS)


def _dispatch(op: str, tensor: torch.Tensor) -> str:
    backend = select_backend(tensor)
    _last_backend[op] = backend
    return backend


def _detach_when_no_grad(*tensors):
    """The loss Functions form gradients during their forward pass when inputs require grad; under
    torch.no_grad() (evaluation) ctx.needs_input_grad still says True, so hand them detached inputs instead."""
    return tensors if torch.is_grad_enabled() else tuple(t.detach() for t in tensors)


def rms_calibrate(x: torch.Tensor, target_rms, eps: float = 1e-6) -> torch.Tensor:
    """Per example b of x (B, M, D): y_b = x_b * target_rms / sqrt(mean(x_b ** 2) + eps), the mean over all M*D
    entries. target_rms (float or 0-d tensor) is a constant. Output has x's dtype; statistics are fp32."""
    return RMSCalibrateFunction.apply(x, target_rms, eps, _dispatch("rms_calibrate", x))


def k_token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against targets, the LM-head matmul fused in.

    hidden (N, H) student hidden states at the supervised positions, weight (V, H) the LM head (usually frozen),
    targets (N,) int64. reduction "mean" (over non-ignored rows; all ignored gives 0 and zero gradients), "sum",
    or "none" (N,) with 0 at ignored rows. The loss is fp32 (fp64 for fp64 inputs)."""
    hidden, weight = _detach_when_no_grad(hidden, weight)
    return KTokenCEFunction.apply(hidden, weight, targets, ignore_index, reduction,
                                  _dispatch("k_token_ce", hidden))


def kd_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0, teacher_weights=None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """tau^2 * mean over masked-in rows of KL(p_bar || q), the LM-head matmul fused in.

    Student: hidden (N, H) and weight (V, H), q = softmax(hidden @ weight.T / tau). Teachers: teacher_logits
    (T, N, V), no gradient, p_bar = sum_t w_t softmax(teacher_logits[t] / tau) with teacher_weights w (T,)
    normalized to sum 1 (uniform if None). mask (N,) bool, None keeps every row; all masked out gives 0 and zero
    gradients. Gradients reach hidden (and weight when it requires grad). fp32 scalar (fp64 for fp64 inputs)."""
    hidden, weight = _detach_when_no_grad(hidden, weight)
    return KDSoftmaxFunction.apply(hidden, weight, teacher_logits, temperature, teacher_weights, mask,
                                   _dispatch("kd_softmax", hidden))


def kd_topk_loss(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse KD against an offline teacher cache: topk_ids (N, k) int64 distinct per row, topk_logprobs (N, k) the
    teacher's tempered log-probs there; the teacher's remaining mass is one bucket compared with the student's
    mass outside the ids. Same tau^2 scaling and mask rules as kd_softmax_loss; with k = V it equals it (T = 1).
    PyTorch only (chunked, never the full logits)."""
    _last_backend["kd_topk"] = "reference"
    hidden, weight = _detach_when_no_grad(hidden, weight)
    return KDTopKFunction.apply(hidden, weight, topk_ids, topk_logprobs, temperature, mask)


__all__ = [
    "rms_calibrate", "k_token_cross_entropy", "kd_softmax_loss", "kd_topk_loss", "lm_head_logits", "lm_head_argmax",
    "rms_calibrate_reference", "k_token_ce_reference", "kd_softmax_reference", "kd_topk_reference",
    "rms_calibrate_naive", "k_token_ce_naive", "kd_softmax_naive", "kd_topk_naive",
    "triton_available", "select_backend", "last_backend", "triton_launch_counts",
]
