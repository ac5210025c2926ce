"""Helpers shared by the two LM-head losses (k_token_ce.py, kd_softmax.py): vocabulary chunking and fp32 GEMMs.

Both losses walk the vocabulary in chunks of columns, computing one (rows, chunk) block of logits at a time, so
the (N, V) logits never exist in full, and no chunk of a bf16/fp16 head is copied to fp32 beyond CHUNK_BYTES.
`lm_head_logits` and `lm_head_argmax` give the training step its few rows of full logits (teacher logits at K
positions, first-token accuracy) the same way, never through a full-precision copy of the head. Not run directly.
"""

from __future__ import annotations

import torch

# Bytes of fp32 logits one vocabulary chunk may hold. 32 MiB is 2048 columns at N = 4096 rows and 16384 at
# N = 512: large enough that each chunk GEMM runs near peak, small next to the N x V logits of the eager path.
# Tests shrink it to force many chunks.
CHUNK_BYTES = 32 * 2**20
_MIN_CHUNK_COLS = 256
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def vocab_chunk_cols(n_rows: int, vocab: int, n_blocks: int = 1) -> int:
    """Columns per vocabulary chunk for `n_rows` rows such that `n_blocks` fp32 (n_rows, cols) blocks fit
    CHUNK_BYTES; a multiple of 128, at least 256."""
    cols = CHUNK_BYTES // (4 * max(n_rows, 1) * n_blocks)
    cols = max(_MIN_CHUNK_COLS, cols // 128 * 128)
    return min(cols, vocab)


def head_chunk_cols(n_rows: int, weight: torch.Tensor, n_blocks: int = 1) -> int:
    """`vocab_chunk_cols` for the head `weight` (V, H). When the GEMM operands are upcast (a bf16/fp16 head on
    CPU, see `operand_dtype`), each chunk of the head is copied to fp32 as well, so the chunk is also kept to
    CHUNK_BYTES of fp32 head rows: few rows (K-token losses read B*K of them) never mean an fp32 copy of the whole
    head."""
    vocab, width = weight.shape
    cols = vocab_chunk_cols(n_rows, vocab, n_blocks)
    if operand_dtype(weight) != weight.dtype:
        cols = min(cols, max(_MIN_CHUNK_COLS, CHUNK_BYTES // (4 * width) // 128 * 128))
    return min(cols, vocab)


def operand_dtype(weight: torch.Tensor) -> torch.dtype:
    """dtype of the GEMM operands. On CUDA bf16/fp16 stay as they are (tensor cores, fp32 output requested);
    on CPU they are upcast to fp32, since CPU half-precision GEMMs are slow and round their output."""
    if weight.dtype in _HALF_DTYPES and not weight.is_cuda:
        return torch.float32
    return weight.dtype


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics (max, sums, log-sum-exps, accumulators) are fp32; fp64 inputs keep fp64 (exact tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with an fp32 (or fp64) result, whatever the operand dtypes. `out` (contiguous, fp32/fp64 operands
    only) lets the CPU path reuse one buffer for every chunk: glibc keeps freed blocks of a few tens of MB
    mapped, so a fresh buffer per chunk would grow the resident set over a run."""
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b, out=out)
    if a.is_cuda and a.dtype == b.dtype and a.dtype in _HALF_DTYPES:
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS accumulates in fp32 and keeps it
    return a.float() @ b.float()


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place, acc fp32 (or fp64); no (rows, H) temporary when the operands share acc's dtype."""
    if a.dtype == b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    return acc.add_(mm_fp32(a, b))


def chunk_buffer(n_rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Flat storage for one (n_rows, cols) chunk, reused by all chunks via `chunk_view`."""
    return torch.empty(n_rows * cols, dtype=dtype, device=device)


def chunk_view(buffer: torch.Tensor, n_rows: int, cols: int) -> torch.Tensor:
    """A contiguous (n_rows, cols) view of the front of `buffer` (the last chunk may be narrower)."""
    return buffer[: n_rows * cols].view(n_rows, cols)


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (N, H) @ weight (V, H).T -> (N, V) logits in fp32 (fp64 for fp64 inputs), chunk by chunk of the
    vocabulary: a bf16/fp16 head is read as it is on CUDA (fp32 output from the GEMM) and copied up one chunk at
    a time on CPU, so no full-precision copy of the head ever exists (2 GB for a 128k x 4096 head)."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    op = operand_dtype(weight)
    h_op = hidden.to(op)
    out = torch.empty(n_rows, vocab, dtype=stat_dtype(op), device=hidden.device)
    cols = head_chunk_cols(n_rows, weight)
    for v0 in range(0, vocab, cols):
        out[:, v0:v0 + cols] = mm_fp32(h_op, weight[v0:v0 + cols].t())
    return out


def lm_head_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of hidden (N, H) @ weight (V, H).T -> (N,) int64, the first index on ties (as
    torch.argmax), walking the vocabulary in chunks: neither the (N, V) logits nor an fp32 head are formed."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    op = operand_dtype(weight)
    h_op = hidden.to(op)
    best = torch.full((n_rows,), float("-inf"), dtype=stat_dtype(op), device=hidden.device)
    index = torch.zeros(n_rows, dtype=torch.int64, device=hidden.device)
    cols = head_chunk_cols(n_rows, weight)
    for v0 in range(0, vocab, cols):
        value, local = mm_fp32(h_op, weight[v0:v0 + cols].t()).max(dim=1)
        better = value > best  # strictly: an earlier chunk keeps a tie
        best = torch.where(better, value, best)
        index = torch.where(better, local + v0, index)
    return index
