"""Helpers shared by the two LM-head losses (k_token_ce.py, kd_softmax.py): vocabulary chunking and fp32 GEMMs.

Both losses walk the vocabulary in chunks of columns, computing one (rows, chunk) block of logits at a time, so
the (N, V) logits never exist in full. Not run directly.
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
