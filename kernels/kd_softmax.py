"""Knowledge-distillation loss fused with the LM head: the student (the receiver reading soft tokens) against
one or more teachers (the same model, or larger same-tokenizer models, reading the full text).

`kernels.kd_softmax_loss(hidden, weight, teacher_logits, temperature, teacher_weights, mask)`:
student hidden (N, H) and LM head weight (V, H); teacher_logits (T, N, V) from T teachers, no gradient.
Loss = tau^2 * mean over masked-in rows of KL(p_bar || q), q = softmax(hidden @ weight.T / tau) the student,
p_bar = sum_t w_t softmax(teacher_logits[t] / tau) the teachers' mixture. The (N, V) student logits never exist in
full. `kernels.kd_topk_loss` is the sparse variant for an offline teacher cache (top-k ids and log-probs per row),
in PyTorch only. This file holds the derivations, the Triton kernels, their launchers, the autograd.Functions,
the chunked PyTorch reference (the CPU path) and the eager oracles that the tests and the benchmark use.

Tests:      pytest tests/test_kernels_reference.py tests/test_kernels_triton.py -k kd
Benchmark:  python -m kernels.bench --op kd_softmax [--device cpu|cuda]
"""

from __future__ import annotations

import torch

from kernels._lm_head import (addmm_fp32_, chunk_buffer, chunk_view, head_chunk_cols, mm_fp32, operand_dtype,
                              stat_dtype)
from kernels._triton_compat import launch, next_power_of_2, tl, triton

# ----------------------------------------------------------------------------------------------------------------
# Derivation (dense)
#
# Distillation with temperature (Hinton, Vinyals & Dean, 2015): per row, l = h . W^T (V,), q = softmax(l / tau),
# p_t = softmax(z_t / tau) for teacher t, and p_bar = sum_t w_t p_t with sum_t w_t = 1. The teachers are mixed as
# probabilities, not as logits: the mixture keeps every teacher's modes. With log q_v = l_v / tau - lse_q,
#     KL_n = sum_v p_bar_v (log p_bar_v - log q_v),                loss = tau^2 * mean_n KL_n
#     dloss_n / dl_v = tau^2 * (q_v - p_bar_v) / tau = tau * (q_v - p_bar_v)    (sum_v p_bar_v = 1)
#     dh_n = tau * sum_v (q_v - p_bar_v) W_v,                      dW_v = tau * sum_n (q_nv - p_bar_nv) h_n
# The tau^2 keeps the gradient scale independent of tau (Hinton et al.).
#
# p_bar needs every teacher's normalizer before any of its entries is known, and log p_bar of a mixture does not
# split into per-teacher terms, so two walks over the vocabulary (in chunks of columns, all rows at once):
#   pass 1  one online log-sum-exp walk for the student (its chunk logits from a GEMM) and all T teachers:
#           running max m and sum S per row and distribution, rescaled by exp(m - m') when the max rises
#           (Milakov & Gimelshein, 2018).
#   pass 2  recompute the chunk logits; with the final log-sum-exps form q, p_bar, the KL terms and
#           G = tau (q - p_bar) in fp32, then dh += G W_c and, when the head is trainable, dW_c = G^T h.
# Three GEMMs per chunk (two logits, one gradient); the gradient is formed in the forward pass because pass 2
# already has G, and the loss is a scalar mean, so backward only multiplies by upstream / n_rows (a loss scaled
# before backward scales the grads). The Triton kernels do the row-wise work between the cuBLAS GEMMs, one
# program per row, every load upcast to fp32; p_bar = 0 entries (teacher logits of -inf, e.g. padded vocabulary)
# contribute 0 log 0 = 0. Masked-out rows are gathered away before any work; all masked out gives 0 and zero
# gradients.
#
# Derivation (sparse, `kd_topk_loss`)
#
# An offline cache keeps, per row, the teacher's top-k ids S and tempered log-probs a_i = log p_i. The rest of the
# teacher's mass P = 1 - sum_i p_i is one tail bucket, compared with the student's tail Q = sum_{v not in S} q_v:
#     KL_n = sum_{i in S} p_i (a_i - log q_i) + P (log P - log Q),  log Q = lse_tail - lse_q,
#     lse_tail = log sum_{v not in S} exp(l_v / tau)   (a masked log-sum-exp: no 1 - sum cancellation)
#     dloss_n / dl_v = tau * ( c q_v - [v in S] p_v - [v not in S] P exp(l_v / tau - lse_tail) ),  c = sum_i p_i + P
# With k = V the tail is empty, the bucket is dropped (0 log 0), and the loss equals the dense one with T = 1.
# The bucket is also dropped where P <= 0 (rounding when the top-k holds all the mass). Ids must be distinct.
# ----------------------------------------------------------------------------------------------------------------

_MAX_BLOCK_V = 1024


@triton.jit
def _online_lse_row(row_ptr, n_cols, scale, m, s, BLOCK_V: tl.constexpr):
    # Fold scale * row[0:n_cols] into the running (max m, sum S). -inf entries are allowed: while every entry seen
    # is -inf the reference point is 0, so S stays 0 instead of becoming nan.
    start = tl.full([], 0, tl.int32)
    while start < n_cols:  # not range(): triton 3.6's interpreter fails on runtime bounds
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
        start += BLOCK_V
    return m, s


@triton.jit
def _kd_online_lse_kernel(logits_ptr, logits_row_stride, teacher_ptr, teacher_t_stride, teacher_row_stride,
                          rows_ptr, m_ptr, s_ptr, n_rows, n_cols, inv_tau, N_TEACHERS: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    # Pass 1, one program per student row: slot 0 of m/s (1 + T, n_rows) is the student, slot 1 + t teacher t.
    # rows_ptr maps the student row to its row in teacher_logits (masked-out rows were gathered away).
    row = tl.program_id(0).to(tl.int64)
    m, s = _online_lse_row(logits_ptr + row * logits_row_stride, n_cols, inv_tau, tl.load(m_ptr + row),
                           tl.load(s_ptr + row), BLOCK_V)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    teacher_row_ptr = teacher_ptr + tl.load(rows_ptr + row) * teacher_row_stride
    for t in tl.static_range(N_TEACHERS):  # T is small: unrolled, one compile per T
        slot = (t + 1) * n_rows + row
        m, s = _online_lse_row(teacher_row_ptr, n_cols, inv_tau, tl.load(m_ptr + slot), tl.load(s_ptr + slot),
                               BLOCK_V)
        tl.store(m_ptr + slot, m)
        tl.store(s_ptr + slot, s)
        teacher_row_ptr += teacher_t_stride  # pointer steps: no int32 overflow of t * stride


@triton.jit
def _kd_grad_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, teacher_ptr, teacher_t_stride,
                    teacher_row_stride, rows_ptr, lse_ptr, teacher_w_ptr, kl_ptr, n_rows, n_cols, inv_tau, tau,
                    N_TEACHERS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # Pass 2, one program per student row: kl[row] += sum over the chunk of p_bar (log p_bar - log q), and
    # (WRITE_GRAD) grad = tau * (q - p_bar), all in fp32 before the store.
    row = tl.program_id(0).to(tl.int64)
    lse_q = tl.load(lse_ptr + row)
    teacher_base = teacher_ptr + tl.load(rows_ptr + row) * teacher_row_stride
    kl = tl.zeros([BLOCK_V], dtype=tl.float32)
    start = tl.full([], 0, tl.int32)
    while start < n_cols:
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < n_cols
        log_q = tl.load(logits_ptr + row * logits_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        log_q = log_q * inv_tau - lse_q
        p_bar = tl.zeros([BLOCK_V], dtype=tl.float32)
        teacher_row_ptr = teacher_base
        for t in tl.static_range(N_TEACHERS):  # T is small: unrolled, one compile per T
            z = tl.load(teacher_row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
            lse_t = tl.load(lse_ptr + (t + 1) * n_rows + row)
            p_bar += tl.load(teacher_w_ptr + t) * tl.exp(z * inv_tau - lse_t)
            teacher_row_ptr += teacher_t_stride
        kl += tl.where(p_bar > 0.0, p_bar * (tl.log(tl.where(p_bar > 0.0, p_bar, 1.0)) - log_q), 0.0)
        if WRITE_GRAD:
            grad = tau * (tl.exp(log_q) - p_bar)
            tl.store(grad_ptr + row * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)
        start += BLOCK_V
    tl.store(kl_ptr + row, tl.load(kl_ptr + row) + tl.sum(kl, axis=0))


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk steps: the Triton launch or its PyTorch twin (the reference path), same contract.
# logits (n, cols) fp32 student chunk; teacher_chunk (T, N, cols) a view of teacher_logits; rows (n,) int64.
# ----------------------------------------------------------------------------------------------------------------


def _online_lse_torch(x, m, s, consume=False):
    """Fold x (n, cols) into running (m, s) (n,) in place; -inf entries allowed. consume: x is scratch, reuse it."""
    m_new = torch.maximum(m, x.amax(dim=1))
    m_ref = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    e = x.sub_(m_ref[:, None]).exp_() if consume else torch.exp(x - m_ref[:, None])
    s.mul_(torch.exp(m - m_ref)).add_(e.sum(dim=1))
    m.copy_(m_new)


def _teacher_rows(teacher_t, rows):
    """teacher_t (N, cols) at the kept rows: a view when every row is kept (rows come sorted and unique)."""
    return teacher_t if rows.numel() == teacher_t.shape[0] else teacher_t.index_select(0, rows)


def _lse_step(logits, teacher_chunk, rows, m, s, inv_tau, scratch, backend):
    """Fold the chunk into the student's (slot 0) and every teacher's (slot 1 + t) running max / sum."""
    n_rows, n_cols = logits.shape
    if backend == "triton":
        launch(_kd_online_lse_kernel, (n_rows,), logits, logits.stride(0), teacher_chunk, teacher_chunk.stride(0),
               teacher_chunk.stride(1), rows, m, s, n_rows, n_cols, inv_tau, N_TEACHERS=teacher_chunk.shape[0],
               BLOCK_V=min(_MAX_BLOCK_V, next_power_of_2(n_cols)))
        return
    _online_lse_torch(logits.mul_(inv_tau), m[0], s[0], consume=True)
    tmp = scratch[0]
    for t in range(teacher_chunk.shape[0]):
        tmp.copy_(_teacher_rows(teacher_chunk[t], rows)).mul_(inv_tau)  # upcast first, then scale in fp32
        _online_lse_torch(tmp, m[t + 1], s[t + 1], consume=True)


def _grad_step(logits, teacher_chunk, rows, lse, teacher_w, kl, inv_tau, tau, out_dtype, want_grad, scratch,
               backend):
    """Add the chunk's KL terms into kl (n,); return tau * (q - p_bar) in out_dtype (over logits if fp32)."""
    n_rows, n_cols = logits.shape
    if backend == "triton":
        grad = logits if (not want_grad or out_dtype == logits.dtype) else torch.empty_like(logits, dtype=out_dtype)
        launch(_kd_grad_kernel, (n_rows,), logits, logits.stride(0), grad, grad.stride(0), teacher_chunk,
               teacher_chunk.stride(0), teacher_chunk.stride(1), rows, lse, teacher_w, kl, n_rows, n_cols, inv_tau,
               tau, N_TEACHERS=teacher_chunk.shape[0], WRITE_GRAD=want_grad,
               BLOCK_V=min(_MAX_BLOCK_V, next_power_of_2(n_cols)))
        return grad if want_grad else None
    tmp, p_bar = scratch
    log_q = logits.mul_(inv_tau).sub_(lse[0][:, None])
    p_bar.zero_()
    for t in range(teacher_chunk.shape[0]):
        tmp.copy_(_teacher_rows(teacher_chunk[t], rows)).mul_(inv_tau)  # upcast first, then scale in fp32
        p_bar.add_(tmp.sub_(lse[t + 1][:, None]).exp_().mul_(teacher_w[t]))
    torch.special.xlogy(p_bar, p_bar, out=tmp)  # p log p, 0 where p = 0
    kl.add_(tmp.addcmul_(p_bar, log_q, value=-1.0).sum(dim=1))
    return log_q.exp_().sub_(p_bar).mul_(tau).to(out_dtype) if want_grad else None


# ----------------------------------------------------------------------------------------------------------------
# Launchers: walk the vocabulary twice. `hidden` holds only the masked-in rows; rows maps them into teacher_logits.
# ----------------------------------------------------------------------------------------------------------------


def kd_softmax_forward(hidden, weight, teacher_logits, rows, teacher_w, temperature, need_dhidden, need_dweight,
                       backend):
    """-> kl (n,) = KL(p_bar || q) per row (no tau^2), dh (n, H) and dW (V, H) of tau^2 * sum_n KL_n, or None.

    All fp32 (fp64 for fp64 inputs)."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    n_teachers = teacher_logits.shape[0]
    op_dtype = operand_dtype(weight)
    stat = stat_dtype(op_dtype)
    h_op = hidden.to(op_dtype)
    inv_tau, tau = 1.0 / temperature, float(temperature)
    # The reference path holds three chunk-sized fp32 blocks (logits, p_bar, a temporary), so chunks are a third
    # as wide as for the cross-entropy; the Triton path needs only the logits (and a bf16 gradient on CUDA).
    cols = head_chunk_cols(n_rows, weight, n_blocks=3)
    buffer = chunk_buffer(n_rows, cols, stat, hidden.device)
    scratch_buffers = [] if backend == "triton" else [chunk_buffer(n_rows, cols, stat, hidden.device)
                                                      for _ in range(2)]

    def chunk_logits(w_chunk):
        return mm_fp32(h_op, w_chunk.t(), out=chunk_view(buffer, n_rows, w_chunk.shape[0]))

    def scratch(n_cols):
        return [chunk_view(b, n_rows, n_cols) for b in scratch_buffers]

    m = torch.full((1 + n_teachers, n_rows), float("-inf"), dtype=stat, device=hidden.device)
    s = torch.zeros_like(m)
    for v0 in range(0, vocab, cols):
        logits = chunk_logits(weight[v0:v0 + cols])
        _lse_step(logits, teacher_logits[:, :, v0:v0 + cols], rows, m, s, inv_tau, scratch(logits.shape[1]),
                  backend)
    lse = (m + torch.log(s)).contiguous()

    want_grad = need_dhidden or need_dweight
    kl = torch.zeros(n_rows, dtype=stat, device=hidden.device)
    dhidden = torch.zeros(n_rows, width, dtype=stat, device=hidden.device) if need_dhidden else None
    dweight = torch.empty(vocab, width, dtype=stat, device=hidden.device) if need_dweight else None
    for v0 in range(0, vocab, cols):
        w_chunk = weight[v0:v0 + cols]
        logits = chunk_logits(w_chunk)
        grad = _grad_step(logits, teacher_logits[:, :, v0:v0 + cols], rows, lse, teacher_w, kl, inv_tau, tau,
                          op_dtype, want_grad, scratch(logits.shape[1]), backend)
        if need_dhidden:
            addmm_fp32_(dhidden, grad, w_chunk.to(op_dtype))
        if need_dweight:
            dweight[v0:v0 + cols] = mm_fp32(grad.t(), h_op)
    return kl, dhidden, dweight


# ----------------------------------------------------------------------------------------------------------------
# autograd (dense)
# ----------------------------------------------------------------------------------------------------------------


def _mask_rows(mask, n_rows, device):
    if mask is None:
        return torch.arange(n_rows, device=device)
    if mask.shape != (n_rows,) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({n_rows},), got {mask.dtype} {tuple(mask.shape)}")
    return mask.nonzero().squeeze(1)


def _check_head(name, hidden, weight, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise TypeError(f"{name}: hidden and weight need one float dtype, got {hidden.dtype} and {weight.dtype}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _normalized_teacher_weights(teacher_weights, n_teachers, dtype, device):
    if teacher_weights is None:
        return torch.full((n_teachers,), 1.0 / n_teachers, dtype=dtype, device=device)
    w = torch.as_tensor(teacher_weights, dtype=dtype, device=device).detach().reshape(-1)
    if w.numel() != n_teachers or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"teacher_weights must be {n_teachers} non-negative numbers with a positive sum, got "
                         f"{w.tolist()}")
    return w / w.sum()


def _mean_loss_backward(ctx, grad_out):
    """(dhidden, dweight) of a loss that is a mean over the kept rows, from the per-row-sum gradients saved by
    forward: both only need scaling by upstream / n_rows (and dhidden scattering back to all N rows)."""
    rows, dhidden_rows, dweight_sum = ctx.saved_tensors
    h_shape, h_dtype, w_shape, w_dtype = ctx.shapes_dtypes
    n_rows = rows.numel()
    scale = grad_out / max(n_rows, 1)
    dhidden = dweight = None
    if ctx.needs_input_grad[0]:
        dhidden = torch.zeros(h_shape, dtype=h_dtype, device=grad_out.device)
        if n_rows:
            dhidden.index_copy_(0, rows, (dhidden_rows * scale).to(h_dtype))
    if ctx.needs_input_grad[1]:
        if n_rows:
            dweight = (dweight_sum * scale).to(w_dtype)
        else:
            dweight = torch.zeros(w_shape, dtype=w_dtype, device=grad_out.device)
    return dhidden, dweight


class KDSoftmaxFunction(torch.autograd.Function):
    """tau^2 * mean masked KL(p_bar || softmax(hidden W^T / tau)); backend 'triton' or 'reference'."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, temperature, teacher_weights, mask, backend):
        _check_head("kd_softmax_loss", hidden, weight, temperature)
        if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != (hidden.shape[0], weight.shape[0]):
            raise ValueError(f"kd_softmax_loss: teacher_logits must be (T, N, V) = (T, {hidden.shape[0]}, "
                             f"{weight.shape[0]}), got {tuple(teacher_logits.shape)}")
        if teacher_logits.stride(-1) != 1:
            teacher_logits = teacher_logits.contiguous()
        stat = stat_dtype(hidden.dtype)
        rows = _mask_rows(mask, hidden.shape[0], hidden.device)
        teacher_w = _normalized_teacher_weights(teacher_weights, teacher_logits.shape[0], stat, hidden.device)
        n_rows = rows.numel()
        dhidden_rows = dweight = None
        loss = torch.zeros((), dtype=stat, device=hidden.device)
        if n_rows:
            kl, dhidden_rows, dweight = kd_softmax_forward(
                hidden.index_select(0, rows), weight, teacher_logits.detach(), rows, teacher_w, temperature,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], backend)
            loss = temperature ** 2 * kl.sum() / n_rows
        ctx.save_for_backward(rows, dhidden_rows, dweight)
        ctx.shapes_dtypes = (hidden.shape, hidden.dtype, weight.shape, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return (*_mean_loss_backward(ctx, grad_out), None, None, None, None, None)


def kd_softmax_reference(hidden, weight, teacher_logits, temperature=1.0, teacher_weights=None, mask=None):
    """The chunked PyTorch implementation of kd_softmax_loss (never the full logits).

    hidden (N, H) student, weight (V, H) its LM head, teacher_logits (T, N, V) teachers, mask (N,) bool."""
    if not torch.is_grad_enabled():  # skip the gradient work of the forward pass (see kernels/__init__.py)
        hidden, weight = hidden.detach(), weight.detach()
    return KDSoftmaxFunction.apply(hidden, weight, teacher_logits, temperature, teacher_weights, mask, "reference")


def kd_softmax_naive(hidden, weight, teacher_logits, temperature=1.0, teacher_weights=None, mask=None):
    """Eager autograd with full (N, V) logits in fp32 (fp64 for fp64): the tests' oracle and the bench's `naive`."""
    stat = stat_dtype(hidden.dtype)
    log_q = torch.log_softmax((hidden @ weight.t()).to(stat) / temperature, dim=-1)
    teacher_w = _normalized_teacher_weights(teacher_weights, teacher_logits.shape[0], stat, hidden.device)
    p_bar = torch.einsum("t,tnv->nv", teacher_w, torch.softmax(teacher_logits.to(stat) / temperature, dim=-1))
    kl = (torch.special.xlogy(p_bar, p_bar) - p_bar * log_q).sum(dim=-1)
    if mask is not None:
        kl = kl[mask]
    if kl.numel() == 0:
        return log_q.sum() * 0.0
    return temperature ** 2 * kl.mean()


# ----------------------------------------------------------------------------------------------------------------
# Sparse variant (PyTorch only): the offline teacher cache of top-k ids and log-probs
# ----------------------------------------------------------------------------------------------------------------


def _chunk_topk_mask(local_ids, inside, n_cols):
    """(n, cols) bool: True at the chunk-local columns of each row's top-k ids."""
    mask = torch.zeros(local_ids.shape[0], n_cols + 1, dtype=torch.bool, device=local_ids.device)
    mask.scatter_(1, torch.where(inside, local_ids, n_cols), True)  # ids outside the chunk land in a spare column
    return mask[:, :n_cols]


def kd_topk_forward(hidden, weight, topk_ids, topk_logprobs, temperature, need_dhidden, need_dweight):
    """-> kl (n,), dh (n, H), dW (V, H) of tau^2 * sum_n KL_n (see the sparse derivation above)."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    op_dtype = operand_dtype(weight)
    stat = stat_dtype(op_dtype)
    h_op = hidden.to(op_dtype)
    inv_tau, tau = 1.0 / temperature, float(temperature)
    cols = head_chunk_cols(n_rows, weight)

    def scaled_logits(v0):
        return mm_fp32(h_op, weight[v0:v0 + cols].t()).mul_(inv_tau)

    def chunk_ids(v0, n_cols):
        local = topk_ids - v0
        inside = (local >= 0) & (local < n_cols)
        return local.clamp(0, n_cols - 1), inside, _chunk_topk_mask(local, inside, n_cols)

    # Pass 1: lse over the whole vocabulary and over the tail, and the student's scaled logits at the ids.
    m_all = torch.full((n_rows,), float("-inf"), dtype=stat, device=hidden.device)
    s_all, m_tail, s_tail = torch.zeros_like(m_all), m_all.clone(), torch.zeros_like(m_all)
    student_at_ids = torch.zeros(topk_ids.shape, dtype=stat, device=hidden.device)
    for v0 in range(0, vocab, cols):
        x = scaled_logits(v0)
        safe_local, inside, in_topk = chunk_ids(v0, x.shape[1])
        student_at_ids = torch.where(inside, x.gather(1, safe_local), student_at_ids)
        _online_lse_torch(x, m_all, s_all)
        _online_lse_torch(x.masked_fill_(in_topk, float("-inf")), m_tail, s_tail, consume=True)
    lse_all = m_all + torch.log(s_all)
    lse_tail = m_tail + torch.log(s_tail)  # -inf when the ids cover the vocabulary

    p = topk_logprobs.to(stat).exp()
    p_tail = (1.0 - p.sum(dim=1)).clamp_min(0.0)
    tail_on = (s_tail > 0) & (p_tail > 0)
    p_tail = torch.where(tail_on, p_tail, torch.zeros_like(p_tail))
    log_q_ids = student_at_ids - lse_all[:, None]
    kl = torch.where(p > 0, p * (topk_logprobs.to(stat) - log_q_ids), torch.zeros_like(p)).sum(dim=1)
    safe_lse_tail = torch.where(tail_on, lse_tail, torch.zeros_like(lse_tail))
    kl += torch.where(tail_on, p_tail * (torch.log(p_tail) - (safe_lse_tail - lse_all)), torch.zeros_like(kl))

    # Pass 2: recompute each chunk; G = tau * (c q - [v in S] p - [v not in S] P exp(l/tau - lse_tail)).
    dhidden = torch.zeros(n_rows, width, dtype=stat, device=hidden.device) if need_dhidden else None
    dweight = torch.empty(vocab, width, dtype=stat, device=hidden.device) if need_dweight else None
    if need_dhidden or need_dweight:
        coef = p.sum(dim=1) + p_tail
        for v0 in range(0, vocab, cols):
            x = scaled_logits(v0)
            safe_local, inside, in_topk = chunk_ids(v0, x.shape[1])
            tail_prob = torch.exp(x - safe_lse_tail[:, None]).masked_fill_(in_topk | ~tail_on[:, None], 0.0)
            grad = torch.exp(x - lse_all[:, None]).mul_(coef[:, None]).sub_(tail_prob.mul_(p_tail[:, None]))
            grad.scatter_add_(1, safe_local, torch.where(inside, -p, torch.zeros_like(p)))
            grad.mul_(tau)
            w_chunk = weight[v0:v0 + cols]
            if need_dhidden:
                dhidden.add_(mm_fp32(grad.to(op_dtype), w_chunk.to(op_dtype)))
            if need_dweight:
                dweight[v0:v0 + cols] = mm_fp32(grad.t().to(op_dtype), h_op)
    return kl, dhidden, dweight


class KDTopKFunction(torch.autograd.Function):
    """tau^2 * mean masked KL(top-k teacher + tail bucket || student + tail bucket); PyTorch only."""

    @staticmethod
    def forward(ctx, hidden, weight, topk_ids, topk_logprobs, temperature, mask):
        _check_head("kd_topk_loss", hidden, weight, temperature)
        if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_logprobs.shape != topk_ids.shape:
            raise ValueError(f"kd_topk_loss: topk_ids and topk_logprobs must both be (N, k) with N = "
                             f"{hidden.shape[0]}, got {tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}")
        if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= weight.shape[0]):
            raise ValueError(f"kd_topk_loss: topk_ids must lie in [0, {weight.shape[0]})")
        sorted_ids = topk_ids.sort(dim=1).values
        if bool((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any()):
            raise ValueError("kd_topk_loss: topk_ids must be distinct within a row")
        stat = stat_dtype(hidden.dtype)
        rows = _mask_rows(mask, hidden.shape[0], hidden.device)
        n_rows = rows.numel()
        dhidden_rows = dweight = None
        loss = torch.zeros((), dtype=stat, device=hidden.device)
        if n_rows:
            kl, dhidden_rows, dweight = kd_topk_forward(
                hidden.index_select(0, rows), weight, topk_ids.index_select(0, rows).long(),
                topk_logprobs.detach().index_select(0, rows), temperature, ctx.needs_input_grad[0],
                ctx.needs_input_grad[1])
            loss = temperature ** 2 * kl.sum() / n_rows
        ctx.save_for_backward(rows, dhidden_rows, dweight)
        ctx.shapes_dtypes = (hidden.shape, hidden.dtype, weight.shape, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return (*_mean_loss_backward(ctx, grad_out), None, None, None, None)


def kd_topk_reference(hidden, weight, topk_ids, topk_logprobs, temperature=1.0, mask=None):
    """Sparse KD against an offline top-k cache; topk_ids (N, k) int64, topk_logprobs (N, k) tempered log-probs."""
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
    return KDTopKFunction.apply(hidden, weight, topk_ids, topk_logprobs, temperature, mask)


def kd_topk_naive(hidden, weight, topk_ids, topk_logprobs, temperature=1.0, mask=None):
    """Eager autograd oracle of kd_topk_loss with the full logits."""
    stat = stat_dtype(hidden.dtype)
    log_q = torch.log_softmax((hidden @ weight.t()).to(stat) / temperature, dim=-1)
    p = topk_logprobs.to(stat).exp()
    kl = torch.where(p > 0, p * (topk_logprobs.to(stat) - log_q.gather(1, topk_ids)), torch.zeros_like(p)).sum(1)
    log_q_tail = torch.logsumexp(log_q.scatter(1, topk_ids, float("-inf")), dim=1)
    p_tail = (1.0 - p.sum(dim=1)).clamp_min(0.0)
    tail_on = torch.isfinite(log_q_tail) & (p_tail > 0)
    safe = torch.where(tail_on, log_q_tail, torch.zeros_like(log_q_tail))
    kl = kl + torch.where(tail_on, p_tail * (torch.log(torch.where(tail_on, p_tail, 1.0)) - safe),
                          torch.zeros_like(kl))
    if mask is not None:
        kl = kl[mask]
    if kl.numel() == 0:
        return log_q.sum() * 0.0
    return temperature ** 2 * kl.mean()
