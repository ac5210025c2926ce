"""RMS calibration of soft tokens: rescale each example so its RMS equals the receiver's embedding RMS.

`kernels.rms_calibrate(x, target_rms, eps)` with x (B, M, D): the adapter's output for B examples of M soft
tokens of width D. This file holds the derivation, the Triton kernels, their launchers, the autograd.Function
and the plain-PyTorch reference (`rms_calibrate_reference`, the CPU path) plus the eager oracle
(`rms_calibrate_naive`) that the tests and the benchmark compare against.

Tests:      pytest tests/test_kernels_reference.py tests/test_kernels_triton.py -k rms
Benchmark:  python -m kernels.bench --op rms_calibrate [--device cpu|cuda]
"""

from __future__ import annotations

import torch

from kernels._triton_compat import launch, next_power_of_2, tl, triton

# ----------------------------------------------------------------------------------------------------------------
# Derivation
#
# One example x (M, D) is read as a flat vector of N = M*D entries; t = target_rms is a constant (no grad).
#     ms = (1/N) sum_i x_i^2,      r = (ms + eps)^(-1/2),      s = t * r,      y_i = s * x_i
# Backward with upstream g = dy:
#     dr/dx_j = -(1/2) (ms + eps)^(-3/2) * 2 x_j / N = -r^3 x_j / N
#     dx_j = sum_i g_i dy_i/dx_j = s g_j + t <g, x> dr/dx_j = s g_j - t r^3 x_j <g, x> / N
#          = s * (g_j - x_j * <g, x> / (N (ms + eps))) = s * (g_j - x_j * c),   c = <g, x> r^2 / N
# It is RMSNorm (Zhang & Sennrich, 2019) with the statistic taken over the whole example instead of one row and a
# fixed gain t instead of a learnt one: per-example calibration keeps the relative scale of the M slots.
#
# Both directions need one reduction over the whole example (sum x^2 forward, <g, x> backward). An example of
# 64 x 4096 entries is far more than one program should reduce, so the reduction is split: program (c, b) writes
# the fp32 partial sum of chunk c of example b; the (B, n_chunks) partials are then summed by torch in a fixed
# order, and a second, elementwise launch applies the scale. No atomics, so results are bitwise reproducible.
# Saved for backward: x itself and r (B fp32 numbers), never an fp32 copy of x. Every load is upcast to fp32
# (the Triton interpreter mishandles bf16 arithmetic), stores cast back to the input dtype.
# ----------------------------------------------------------------------------------------------------------------

# Entries one program reduces in the split reduction (a multiple of the load block). Tests shrink it to force
# many chunks on tiny inputs.
RMS_CHUNK = 16384
_LOAD_BLOCK = 1024


@triton.jit
def _rms_partial_dot_kernel(a_ptr, b_ptr, partial_ptr, n_per_example, n_chunks,
                            CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # grid (n_chunks, B): partial[b, c] = sum over chunk c of example b of a * b, accumulated in fp32.
    chunk = tl.program_id(0)
    example = tl.program_id(1)
    base = example.to(tl.int64) * n_per_example
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + offset + tl.arange(0, BLOCK)
        inside = idx < n_per_example
        a = tl.load(a_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
        acc += a * b
    tl.store(partial_ptr + example * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _rms_scale_fwd_kernel(x_ptr, scale_ptr, y_ptr, n_per_example, BLOCK: tl.constexpr):
    # grid (cdiv(N, BLOCK), B): y = s_b * x.
    block = tl.program_id(0)
    example = tl.program_id(1)
    base = example.to(tl.int64) * n_per_example
    idx = block * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n_per_example
    x = tl.load(x_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + example)
    tl.store(y_ptr + base + idx, (x * s).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rms_scale_bwd_kernel(dy_ptr, x_ptr, scale_ptr, coef_ptr, dx_ptr, n_per_example, BLOCK: tl.constexpr):
    # grid (cdiv(N, BLOCK), B): dx = s_b * (dy - x * c_b).
    block = tl.program_id(0)
    example = tl.program_id(1)
    base = example.to(tl.int64) * n_per_example
    idx = block * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n_per_example
    dy = tl.load(dy_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + example)
    c = tl.load(coef_ptr + example)
    tl.store(dx_ptr + base + idx, (s * (dy - x * c)).to(dx_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------------------------
# Launchers. Tensors are (B, N) contiguous views of the (B, M, D) input; statistics are fp32 (fp64 on the
# reference path for fp64 inputs, so the float64 tests are exact).
# ----------------------------------------------------------------------------------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _example_dots(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """(B,) per-example <a_b, b_b> of two (B, N) tensors, accumulated in fp32, split over chunks."""
    n_examples, n_per_example = a.shape
    if backend != "triton":
        stat = _stat_dtype(a.dtype)
        return torch.einsum("bn,bn->b", a.to(stat), b.to(stat))
    block = min(_LOAD_BLOCK, next_power_of_2(min(RMS_CHUNK, n_per_example)))
    chunk = max(block, RMS_CHUNK // block * block)
    n_chunks = triton.cdiv(n_per_example, chunk)
    partial = torch.empty(n_examples, n_chunks, dtype=torch.float32, device=a.device)
    launch(_rms_partial_dot_kernel, (n_chunks, n_examples), a, b, partial, n_per_example, n_chunks,
           CHUNK=chunk, BLOCK=block)
    return partial.sum(dim=1)  # fixed-order reduction of the partials: deterministic


def _apply_forward_scale(x: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    if backend != "triton":
        return (x.to(scale.dtype) * scale[:, None]).to(x.dtype)
    y = torch.empty_like(x)
    block = min(_LOAD_BLOCK, next_power_of_2(x.shape[1]))
    launch(_rms_scale_fwd_kernel, (triton.cdiv(x.shape[1], block), x.shape[0]), x, scale, y, x.shape[1],
           BLOCK=block)
    return y


def _apply_backward_scale(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                          backend: str) -> torch.Tensor:
    if backend != "triton":
        stat = scale.dtype
        return (scale[:, None] * (dy.to(stat) - x.to(stat) * coef[:, None])).to(x.dtype)
    dx = torch.empty_like(x)
    block = min(_LOAD_BLOCK, next_power_of_2(x.shape[1]))
    launch(_rms_scale_bwd_kernel, (triton.cdiv(x.shape[1], block), x.shape[0]), dy, x, scale, coef, dx,
           x.shape[1], BLOCK=block)
    return dx


def rms_calibrate_forward(x2d: torch.Tensor, target_rms, eps: float, backend: str):
    """x2d (B, N) contiguous -> (y2d (B, N) in x's dtype, rstd (B,), scale (B,) = target_rms * rstd)."""
    n_per_example = x2d.shape[1]
    sum_sq = _example_dots(x2d, x2d, backend)
    rstd = torch.rsqrt(sum_sq / n_per_example + eps)
    target = torch.as_tensor(target_rms, dtype=rstd.dtype, device=rstd.device).detach()
    scale = target * rstd
    return _apply_forward_scale(x2d, scale, backend), rstd, scale


def rms_calibrate_backward(dy2d: torch.Tensor, x2d: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor,
                           backend: str) -> torch.Tensor:
    """dx = s * (dy - x * <dy, x> r^2 / N), per example; all (B, N)."""
    dots = _example_dots(dy2d, x2d, backend)
    coef = dots * rstd * rstd / x2d.shape[1]
    return _apply_backward_scale(dy2d, x2d, scale, coef, backend)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


def _check_rms_inputs(x: torch.Tensor, eps: float) -> None:
    if x.dim() != 3:
        raise ValueError(f"rms_calibrate: x must be (B, M, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"rms_calibrate: x must be a float tensor, got {x.dtype}")
    if eps < 0:
        raise ValueError(f"rms_calibrate: eps must be >= 0, got {eps}")


class RMSCalibrateFunction(torch.autograd.Function):
    """y_b = x_b * target_rms / sqrt(mean(x_b^2) + eps) per example; backend 'triton' or 'reference'."""

    @staticmethod
    def forward(ctx, x, target_rms, eps, backend):
        _check_rms_inputs(x, eps)
        x2d = x.reshape(x.shape[0], -1).contiguous()
        if x2d.numel() == 0:
            ctx.empty = True
            return x.clone()
        ctx.empty = False
        y2d, rstd, scale = rms_calibrate_forward(x2d, target_rms, eps, backend)
        ctx.save_for_backward(x2d, rstd, scale)
        ctx.backend = backend
        ctx.shape = x.shape
        return y2d.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        if ctx.empty:
            return torch.zeros_like(dy), None, None, None
        x2d, rstd, scale = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape).contiguous()
        dx2d = rms_calibrate_backward(dy2d, x2d, rstd, scale, ctx.backend)
        return dx2d.view(ctx.shape), None, None, None


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path) and the eager oracle
# ----------------------------------------------------------------------------------------------------------------


def rms_calibrate_reference(x: torch.Tensor, target_rms, eps: float = 1e-6) -> torch.Tensor:
    """x (B, M, D) -> (B, M, D), same dtype: the PyTorch implementation of the Triton kernels above."""
    return RMSCalibrateFunction.apply(x, target_rms, eps, "reference")


def rms_calibrate_naive(x: torch.Tensor, target_rms, eps: float = 1e-6) -> torch.Tensor:
    """Eager autograd version in fp32 (fp64 for fp64 x): the oracle of the tests and the bench's `naive`."""
    x_stat = x.to(_stat_dtype(x.dtype))
    mean_sq = x_stat.pow(2).mean(dim=(1, 2), keepdim=True)
    target = torch.as_tensor(target_rms, dtype=x_stat.dtype, device=x.device).detach()
    return (x_stat * (target * torch.rsqrt(mean_sq + eps))).to(x.dtype)
