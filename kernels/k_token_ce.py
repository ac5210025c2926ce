"""K-token cross-entropy fused with the LM head: the receiver's loss on its first K answer tokens.

`kernels.k_token_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean")` takes the receiver's
final hidden states at the supervised positions, hidden (N, H) with N = B*K rows, its frozen LM head weight (V, H)
and targets (N,), and returns mean_n -log softmax(hidden @ weight.T)[n, targets[n]] over non-ignored rows,
without ever holding the (N, V) logits. This file holds the derivation, the Triton kernels, their launchers,
the autograd.Function, the chunked PyTorch reference (`k_token_ce_reference`, the CPU path) and the eager oracle
(`k_token_ce_naive`) that the tests and the benchmark compare against.

Tests:      pytest tests/test_kernels_reference.py tests/test_kernels_triton.py -k ce
Benchmark:  python -m kernels.bench --op k_token_ce [--device cpu|cuda]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._lm_head import (addmm_fp32_, chunk_buffer, chunk_view, head_chunk_cols, mm_fp32, operand_dtype,
                              stat_dtype)
from kernels._triton_compat import launch, next_power_of_2, tl, triton

# ----------------------------------------------------------------------------------------------------------------
# Derivation
#
# Rows n are the non-ignored ones (n_valid of them); h_n = hidden[n], W_v = weight[v], l_nv = h_n . W_v,
# y_n the target.
#     loss_n = lse_n - l_{n,y_n},                lse_n = log sum_v exp(l_nv)
#     dloss_n / dl_nv = p_nv - [v = y_n],        p_nv = exp(l_nv - lse_n)
#     dh_n = sum_v (p_nv - [v = y_n]) W_v  = A_n / S_n - W_{y_n},
#            with S_n = sum_v exp(l_nv - m_n), A_n = sum_v exp(l_nv - m_n) W_v (an H-vector), m_n any reference
#     dW_v = sum_n c_n (p_nv - [v = y_n]) h_n,   c_n = upstream gradient of row n (g / n_valid for "mean")
#
# Online softmax (Milakov & Gimelshein, 2018; the recurrence FlashAttention uses, Dao et al., 2022): walk the
# vocabulary in chunks of columns and keep per row the running max m, S and A. A chunk that raises the max from
# m to m' rescales both by alpha = exp(m - m') before adding its own exp(l - m') terms. After the last chunk
# lse = m + log S and dh = A / S - W_y. This is attention with queries = hidden and keys = values = the head.
#
# Per chunk that is two GEMMs, logits_c = h W_c^T and A += e_c W_c: the same two GEMMs the eager
# forward + backward runs, and the head (1 GB for Llama-3.1-8B in bf16) is read twice in total, whatever N is.
# Chunks tile the vocabulary, with all rows in every chunk, so there is no small-row-chunk re-reading of the head.
# Memory: one (n_valid, chunk) block of fp32 logits plus A (n_valid, H) in fp32.
#
# Why dhidden is formed in the forward pass: A needs the same pass over the head as the log-sum-exp, so doing it
# later would mean recomputing every chunk of logits (a third GEMM). Backward then only multiplies dh_n by c_n,
# so a loss scaled by a constant, "sum" or per-row ("none") upstream gradients are exact. A is skipped when hidden
# needs no gradient (evaluation). dW is only needed when the head is trainable (the receivers' heads are frozen):
# it needs the final lse, so backward walks the vocabulary once more, recomputing each chunk of logits and
# forming c_n (p - onehot) in fp32 before dW_c = G_c^T h.
#
# Why the GEMMs are cuBLAS and not tl.dot: a Triton program cannot keep the (rows, H) accumulator A in registers
# across vocabulary tiles when H = 4096, so a tl.dot-fused kernel would need a recompute GEMM. The Triton
# kernels do the row-wise work between the GEMMs: the online max/sum update and exp(l - m') (forward), and
# c_n (p - onehot) (backward for dW), one program per row, loads upcast to fp32.
#
# Precision: chunk logits come out of the GEMM in fp32 (cuBLAS fp32 output for bf16 operands on CUDA, fp32
# operands on CPU). m, S, A, lse are fp32. The target logit is h_n . W_{y_n} computed directly in fp32, and
# p_y - 1 never exists in low precision: dh = A / S - W_y is an fp32 subtraction, and the dW kernel forms p - 1
# in fp32. Ignored rows are gathered out before any work, so they cost nothing and contribute nothing; when all
# rows are ignored the loss is 0 and the gradients are zeros.
# ----------------------------------------------------------------------------------------------------------------

_MAX_BLOCK_V = 1024


@triton.jit
def _k_token_ce_online_kernel(logits_ptr, logits_row_stride, e_ptr, e_row_stride, m_ptr, s_ptr, alpha_ptr,
                              n_cols, WRITE_E: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per row of one vocabulary chunk: update the running max m and sum S, write alpha = exp(m - m')
    # for the caller's rescale of A, and (WRITE_E) e = exp(l - m') for the A += e W_c GEMM. e may alias logits.
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    m_old = tl.load(m_ptr + row)
    block_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    start = tl.full([], 0, tl.int32)
    while start < n_cols:  # not range(): triton 3.6's interpreter fails on runtime bounds
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        block_max = tl.maximum(block_max, x)
        start += BLOCK_V
    m_new = tl.maximum(m_old, tl.max(block_max, axis=0))
    alpha = tl.exp(m_old - m_new)  # 0 on the first chunk, where m_old = -inf
    block_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    start = tl.full([], 0, tl.int32)
    while start < n_cols:
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < n_cols
        x = tl.load(logits_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - m_new)
        block_sum += e
        if WRITE_E:
            tl.store(e_ptr + row * e_row_stride + cols, e.to(e_ptr.dtype.element_ty), mask=inside)
        start += BLOCK_V
    s_new = tl.load(s_ptr + row) * alpha + tl.sum(block_sum, axis=0)
    tl.store(m_ptr + row, m_new)
    tl.store(s_ptr + row, s_new)
    tl.store(alpha_ptr + row, alpha)


@triton.jit
def _k_token_ce_dlogits_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, lse_ptr, target_ptr,
                               scale_ptr, n_cols, BLOCK_V: tl.constexpr):
    # One program per row of one vocabulary chunk: grad = c_n * (exp(l - lse) - [col = target]), in fp32 before
    # the store. target is the chunk-local column of y_n (outside [0, n_cols) when y_n is in another chunk).
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    target = tl.load(target_ptr + row)
    scale = tl.load(scale_ptr + row)
    start = tl.full([], 0, tl.int32)
    while start < n_cols:
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < n_cols
        x = tl.load(logits_ptr + row * logits_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        grad = tl.where(cols == target, p - 1.0, p) * scale
        tl.store(grad_ptr + row * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)
        start += BLOCK_V


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk steps: the Triton launch or its PyTorch twin (the reference path), same contract.
# ----------------------------------------------------------------------------------------------------------------


def _online_step(logits, m, s, alpha, e_dtype, want_e, backend):
    """Update m, s in place from a (rows, cols) fp32 chunk, write alpha; return e = exp(logits - m') or None.

    e is written over `logits` when the dtypes agree (fp32 operands), else into a new e_dtype buffer."""
    n_rows, n_cols = logits.shape
    if backend == "triton":
        e = logits if (not want_e or e_dtype == logits.dtype) else torch.empty_like(logits, dtype=e_dtype)
        launch(_k_token_ce_online_kernel, (n_rows,), logits, logits.stride(0), e, e.stride(0), m, s, alpha, n_cols,
               WRITE_E=want_e, BLOCK_V=min(_MAX_BLOCK_V, next_power_of_2(n_cols)))
        return e if want_e else None
    m_new = torch.maximum(m, logits.amax(dim=1))
    torch.exp(m - m_new, out=alpha)
    e = logits.sub_(m_new[:, None]).exp_()
    s.mul_(alpha).add_(e.sum(dim=1))
    m.copy_(m_new)
    return e.to(e_dtype) if want_e else None


def _dlogits_step(logits, lse, local_targets, row_scale, out_dtype, backend):
    """(rows, cols) fp32 chunk logits -> row_scale * (softmax - onehot) in out_dtype (over logits if fp32)."""
    n_rows, n_cols = logits.shape
    if backend == "triton":
        grad = logits if out_dtype == logits.dtype else torch.empty_like(logits, dtype=out_dtype)
        launch(_k_token_ce_dlogits_kernel, (n_rows,), logits, logits.stride(0), grad, grad.stride(0), lse,
               local_targets, row_scale, n_cols, BLOCK_V=min(_MAX_BLOCK_V, next_power_of_2(n_cols)))
        return grad
    grad = logits.sub_(lse[:, None]).exp_()
    in_chunk = (local_targets >= 0) & (local_targets < n_cols)
    rows = in_chunk.nonzero().squeeze(1)
    grad[rows, local_targets[rows]] -= 1.0
    return grad.mul_(row_scale[:, None]).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: walk the vocabulary. `hidden` here holds only the valid rows.
# ----------------------------------------------------------------------------------------------------------------


def k_token_ce_forward(hidden, weight, targets, need_dhidden, backend):
    """hidden (n, H), weight (V, H), targets (n,) all valid -> loss_rows (n,), lse (n,), dh (n, H) or None.

    dh is the gradient of each row's own loss (unscaled); all three are fp32 (fp64 for fp64 inputs)."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    op_dtype = operand_dtype(weight)
    stat = stat_dtype(op_dtype)
    h_op = hidden.to(op_dtype)
    m = torch.full((n_rows,), float("-inf"), dtype=stat, device=hidden.device)
    s = torch.zeros(n_rows, dtype=stat, device=hidden.device)
    alpha = torch.empty_like(s)
    acc = torch.zeros(n_rows, width, dtype=stat, device=hidden.device) if need_dhidden else None
    cols = head_chunk_cols(n_rows, weight)
    buffer = chunk_buffer(n_rows, cols, stat, hidden.device)
    for v0 in range(0, vocab, cols):
        w_chunk = weight[v0:v0 + cols]
        logits = mm_fp32(h_op, w_chunk.t(), out=chunk_view(buffer, n_rows, w_chunk.shape[0]))
        e = _online_step(logits, m, s, alpha, op_dtype, need_dhidden, backend)
        if need_dhidden:
            addmm_fp32_(acc.mul_(alpha[:, None]), e, w_chunk.to(op_dtype))
    lse = m + torch.log(s)
    w_target = weight[targets].to(stat)
    target_logit = torch.bmm(hidden.to(stat).unsqueeze(1), w_target.unsqueeze(2)).view(n_rows)
    dhidden = acc.div_(s[:, None]).sub_(w_target) if need_dhidden else None
    return lse - target_logit, lse, dhidden


def k_token_ce_dweight(hidden, weight, targets, lse, row_scale, backend):
    """dW (V, H) in weight's dtype = sum_n row_scale_n (p_n - onehot_n) h_n, recomputing the logits per chunk."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    op_dtype = operand_dtype(weight)
    h_op = hidden.to(op_dtype)
    dweight = torch.empty_like(weight)
    cols = head_chunk_cols(n_rows, weight)
    buffer = chunk_buffer(n_rows, cols, stat_dtype(op_dtype), hidden.device)
    for v0 in range(0, vocab, cols):
        w_chunk = weight[v0:v0 + cols]
        logits = mm_fp32(h_op, w_chunk.t(), out=chunk_view(buffer, n_rows, w_chunk.shape[0]))
        grad = _dlogits_step(logits, lse, targets - v0, row_scale, op_dtype, backend)
        dweight[v0:v0 + cols] = mm_fp32(grad.t(), h_op).to(weight.dtype)
    return dweight


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _check_ce_inputs(hidden, weight, targets, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"k_token_cross_entropy: need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"k_token_cross_entropy: targets must be (N,) = ({hidden.shape[0]},), got "
                         f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"k_token_cross_entropy: targets must be int64, got {targets.dtype}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise TypeError(f"k_token_cross_entropy: hidden and weight need one float dtype, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"k_token_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


class KTokenCEFunction(torch.autograd.Function):
    """Fused LM head + cross-entropy; backend 'triton' or 'reference'. Returns fp32 (fp64 for fp64 inputs)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, backend):
        _check_ce_inputs(hidden, weight, targets, reduction)
        rows = (targets != ignore_index).nonzero().squeeze(1)
        valid_targets = targets[rows].long()
        n_valid = rows.numel()
        if n_valid and (valid_targets.min() < 0 or valid_targets.max() >= weight.shape[0]):
            raise ValueError(f"k_token_cross_entropy: targets must lie in [0, {weight.shape[0]}) or equal "
                             f"ignore_index={ignore_index}")
        stat = stat_dtype(hidden.dtype)
        dhidden_rows = lse = None
        loss_rows = torch.zeros(0, dtype=stat, device=hidden.device)
        if n_valid:
            loss_rows, lse, dhidden_rows = k_token_ce_forward(hidden[rows], weight, valid_targets,
                                                              ctx.needs_input_grad[0], backend)
        ctx.save_for_backward(hidden, weight, rows, valid_targets, lse, dhidden_rows)
        ctx.reduction, ctx.backend = reduction, backend
        if reduction == "none":
            return torch.zeros(hidden.shape[0], dtype=stat, device=hidden.device).index_copy_(0, rows, loss_rows)
        total = loss_rows.sum()
        return total / max(n_valid, 1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, rows, valid_targets, lse, dhidden_rows = ctx.saved_tensors
        n_valid = rows.numel()
        if ctx.reduction == "none":
            row_scale = grad_out[rows]
        else:
            row_scale = grad_out.expand(n_valid) / (n_valid if ctx.reduction == "mean" else 1)
        row_scale = row_scale.to(stat_dtype(hidden.dtype)).contiguous()
        dhidden = dweight = None
        if ctx.needs_input_grad[0]:
            dhidden = torch.zeros_like(hidden)
            if n_valid:
                dhidden.index_copy_(0, rows, (dhidden_rows * row_scale[:, None]).to(hidden.dtype))
        if ctx.needs_input_grad[1]:
            if n_valid:
                dweight = k_token_ce_dweight(hidden[rows], weight, valid_targets, lse, row_scale, ctx.backend)
            else:
                dweight = torch.zeros_like(weight)
        return dhidden, dweight, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path) and the eager oracle
# ----------------------------------------------------------------------------------------------------------------


def k_token_ce_reference(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """The chunked PyTorch implementation (same algorithm as the Triton path, never the full logits).

    hidden (N, H) student hidden states, weight (V, H) LM head, targets (N,) int64."""
    if not torch.is_grad_enabled():  # skip the gradient work of the forward pass (see kernels/__init__.py)
        hidden, weight = hidden.detach(), weight.detach()
    return KTokenCEFunction.apply(hidden, weight, targets, ignore_index, reduction, "reference")


def k_token_ce_naive(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """Eager autograd with the full (N, V) logits upcast to fp32: the tests' oracle and the bench's `naive`."""
    logits = (hidden @ weight.t()).to(stat_dtype(hidden.dtype))
    n_valid = (targets != ignore_index).sum()
    if reduction == "mean" and n_valid == 0:  # F.cross_entropy gives nan here; the contract says 0
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

