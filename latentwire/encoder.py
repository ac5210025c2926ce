"""Byte encoder and latent pooler: prompt bytes (B, L) -> latent slots Z (B, M_shared + R * M_private, d_z).

The byte transformer reads raw UTF-8 bytes with a padding mask (pad positions can neither be attended to nor
change the pooled result). A set of learned queries then cross-attends to the byte states (gated residual) and
is projected to the wire width d_z. The first `m_shared` slots are read by every receiver; each receiver also
owns `m_private` slots, laid out after the shared ones in receiver order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentwire.config import EncoderConfig

BYTE_VOCAB = 257  # 256 byte values + padding
BYTE_PAD = 256


class Attention(nn.Module):
    """Multi-head attention from `x` (B, Lq, d) to `context` (B, Lk, d) with a key padding mask.

    Written with plain Linear modules (called as modules) rather than nn.MultiheadAttention, whose functional
    path reads `out_proj` weights outside a module call — which ZeRO-3's parameter fetching cannot see. The keys
    have no bias: a key bias adds q.b to every logit of a query's row, which softmax ignores, so its true gradient
    is zero and AdamW would only amplify rounding noise into it.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        b, lq, d = x.shape
        lk = context.shape[1]
        h, dh = self.n_heads, d // self.n_heads
        q = self.q(x).view(b, lq, h, dh).transpose(1, 2)
        k = self.k(context).view(b, lk, h, dh).transpose(1, 2)
        v = self.v(context).view(b, lk, h, dh).transpose(1, 2)
        keep = ~pad_mask[:, None, None, :]  # True where a key may be attended to
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, lq, d))


class Block(nn.Module):
    """Pre-norm transformer layer over bytes: masked self-attention + GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, ff: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(), nn.Linear(ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, pad_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class LocalMix(nn.Module):
    """x + W * gelu(depthwise_conv(norm(x))): each byte state also sums the `kernel` bytes up to and including it,
    so a word's last byte sees the whole word (the value after a name sees the name). Padding is zeroed first."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.kernel = kernel
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).masked_fill(pad_mask.unsqueeze(-1), 0.0).transpose(1, 2)  # (B, d, L)
        h = self.conv(F.pad(h, (self.kernel - 1, 0))).transpose(1, 2)  # left context only: (B, L, d)
        return x + self.proj(F.gelu(h))


class LatentPooler(nn.Module):
    """Learned queries (M, d) attend to byte states; out = q + tanh(gate) * attn, then a gated MLP.

    With `question_queries` the queries first read the QUESTION (the bytes after the prompt's last "Question: "
    label): x = q + tanh(gate_q) * attn_q(q, question states), and only then attend over the whole prompt. Each
    slot then asks the context about what was asked, instead of having to find the matching fact by an
    induction-style circuit inside the byte transformer (docs/toy.md measures the difference)."""

    def __init__(self, n_slots: int, d_model: int, n_heads: int, d_z: int, question_queries: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_slots, d_model) * d_model**-0.5)
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        # Gates start at a small positive value: the pooled signal flows from step 0 but the residual dominates.
        # Shape (1,), not 0-d: DeepSpeed cannot broadcast 0-d tensors.
        self.attn_gate = nn.Parameter(torch.full((1,), 0.5))
        self.question = None
        if question_queries:
            self.question = nn.ModuleDict({"norm_q": nn.LayerNorm(d_model), "norm_kv": nn.LayerNorm(d_model),
                                           "attn": Attention(d_model, n_heads)})
            self.question_gate = nn.Parameter(torch.full((1,), 0.5))
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))
        self.mlp_gate = nn.Parameter(torch.full((1,), 0.5))
        self.out = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_z))

    def forward(self, states: torch.Tensor, pad_mask: torch.Tensor,
                question_pad: torch.Tensor | None = None) -> torch.Tensor:
        """states (B, L, d), pad_mask (B, L) True at padding, question_pad (B, L) True outside the question
        (needed with question_queries) -> (B, M, d_z)."""
        x = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        if self.question is not None:
            q = self.question
            x = x + torch.tanh(self.question_gate) * q["attn"](q["norm_q"](x), q["norm_kv"](states), question_pad)
        x = x + torch.tanh(self.attn_gate) * self.attn(self.norm_q(x), self.norm_kv(states), pad_mask)
        x = x + torch.tanh(self.mlp_gate) * self.mlp(x)
        return self.out(x)


QUESTION_LABEL = b"\nQuestion: "  # latentwire.data.PROMPT_TEMPLATE puts the question after this label


def question_padding(byte_ids: torch.Tensor, mask: torch.Tensor, label: bytes = QUESTION_LABEL) -> torch.Tensor:
    """(B, L) True OUTSIDE the question: the real bytes after the last `label` of each row (the whole prompt when a
    row has no label, so nothing is ever all-masked)."""
    b, length = byte_ids.shape
    n = len(label)
    positions = torch.arange(length, device=byte_ids.device).expand(b, -1)
    start = torch.zeros(b, dtype=torch.long, device=byte_ids.device)
    if length >= n:
        pattern = torch.tensor(list(label), device=byte_ids.device)
        hits = (byte_ids.unfold(1, n, 1) == pattern).all(-1)  # (B, L - n + 1): a label starts here
        last = torch.where(hits, positions[:, : hits.shape[1]], -1).max(dim=1).values
        start = torch.where(last >= 0, last + n, 0)
    inside = (positions >= start[:, None]) & mask
    inside = torch.where(inside.any(dim=1, keepdim=True), inside, mask)  # a label with nothing after it
    return ~inside


def question_match(byte_ids: torch.Tensor, mask: torch.Tensor, question_pad: torch.Tensor,
                   sizes: list[int], label_len: int = len(QUESTION_LABEL), dtype=torch.float32) -> torch.Tensor:
    """(B, L, len(sizes)) `dtype`: feature k is 1 at byte i when the `sizes[k]` bytes ending at i lie in the
    context (before the question's label, which is `label_len` bytes) and occur, byte for byte, somewhere inside
    the same row's question; 0 elsewhere (padding, the label, the question itself). The byte-level form of the
    exact-match feature of extractive readers (DrQA): the context positions that repeat the question's words are
    marked before any layer has to learn to compare them."""
    b, length = byte_ids.shape
    out = torch.zeros(b, length, len(sizes), device=byte_ids.device, dtype=dtype)
    inside = ~question_pad & mask
    positions = torch.arange(length, device=byte_ids.device)
    question_start = torch.where(inside, positions, length).min(dim=1).values  # (B,)
    outside = question_pad & mask & (positions < (question_start - label_len)[:, None])
    for k, n in enumerate(sizes):
        if length < n:
            continue
        weights = 257 ** torch.arange(n, device=byte_ids.device, dtype=torch.long)
        hashes = (byte_ids.unfold(1, n, 1) * weights).sum(-1)  # (B, L - n + 1): exact, 257**7 < 2**63
        in_q = inside.unfold(1, n, 1).all(-1)
        in_c = outside.unfold(1, n, 1).all(-1)
        same = (hashes[:, :, None] == hashes[:, None, :]) & in_c[:, :, None] & in_q[:, None, :]
        out[:, n - 1:, k] = same.any(-1).float()  # a window starting at s ends at s + n - 1
    return out


class ByteEncoder(nn.Module):
    """bytes (B, L) int64 in [0, 256], mask (B, L) bool True at real bytes -> Z (B, M_total, d_z)."""

    def __init__(self, cfg: EncoderConfig, n_receivers: int, max_bytes: int):
        super().__init__()
        self.cfg = cfg
        self.n_receivers = n_receivers
        self.max_bytes = max_bytes
        self.embed = nn.Embedding(BYTE_VOCAB, cfg.d_model, padding_idx=BYTE_PAD)
        # Positions start at the byte embeddings' scale (both N(0, 1)): at 1/50 of it the encoder starts out as a
        # bag of bytes and is slow to tell words apart (measured in the toy world: 10% vs 45% value accuracy after
        # 750 steps, docs/toy.md).
        self.pos = nn.Parameter(torch.randn(max_bytes, cfg.d_model))
        # encoder.match_ngrams: one learned vector per n-gram size, added where the byte ends an n-gram that the
        # question repeats (question_match), at the scale of the byte embeddings.
        self.match = nn.Parameter(torch.randn(len(cfg.match_ngrams), cfg.d_model)) if cfg.match_ngrams else None
        self.local = LocalMix(cfg.d_model, cfg.local_mix) if cfg.local_mix > 1 else None
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.pooler = LatentPooler(self.n_slots, cfg.d_model, cfg.n_heads, cfg.d_z, cfg.question_queries)
        self.quantizer = None
        if cfg.quantizer.kind != "off":  # a learned discrete wire: the slots are de-quantized FSQ codes
            from latentwire.quantizer import SlotQuantizer

            self.quantizer = SlotQuantizer(cfg.d_z, cfg.m_shared, n_receivers * cfg.m_private, cfg.quantizer)

    @property
    def n_slots(self) -> int:
        return self.cfg.m_shared + self.n_receivers * self.cfg.m_private

    def forward(self, byte_ids: torch.Tensor, mask: torch.Tensor, with_codes: bool = False,
                with_states: bool = False):
        """-> Z (B, M_total, d_z), or (Z, codes (B, M_total) int64 or None) with `with_codes`. With a quantizer Z is
        the de-quantized value of the codes (straight-through in training), exactly what the wire rebuilds.
        `with_states` also returns the final byte states (B, L, d_model) last (training-side auxiliary losses:
        they never go on the wire)."""
        if byte_ids.shape[1] > self.max_bytes:
            raise ValueError(f"byte sequence of length {byte_ids.shape[1]} exceeds encoder max_bytes {self.max_bytes}")
        pad = ~mask
        x = self.embed(byte_ids) + self.pos[: byte_ids.shape[1]]
        question_pad = question_padding(byte_ids, mask) if self.cfg.question_queries or self.match is not None else None
        if self.match is not None:
            x = x + question_match(byte_ids, mask, question_pad, self.cfg.match_ngrams,
                                   dtype=self.match.dtype) @ self.match
        if self.local is not None:
            x = self.local(x, pad)
        for layer in self.layers:
            x = layer(x, pad)
        x = self.norm(x)
        z, codes = self.pooler(x, pad, question_pad), None
        if self.quantizer is not None:
            z, codes = self.quantizer(z)
        out = (z,) + ((codes,) if with_codes else ()) + ((x,) if with_states else ())
        return out if len(out) > 1 else z

    def slots_for(self, z: torch.Tensor, receiver_index: int) -> torch.Tensor:
        """Z (B, M_total, d_z) -> the slots receiver `receiver_index` reads: shared then its private ones."""
        m_s, m_p = self.cfg.m_shared, self.cfg.m_private
        start = m_s + receiver_index * m_p
        return torch.cat([z[:, :m_s], z[:, start:start + m_p]], dim=1)


def drop_shared_slots(z: torch.Tensor, m_shared: int, keep_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Curriculum latent dropout: zero each shared slot with prob 1-keep (at least one kept), rescale by 1/keep.

    The mask comes from `generator` (seeded by the global step) so every rank drops the same slots.
    """
    if keep_prob >= 1.0:
        return z
    keep = torch.rand(z.shape[0], m_shared, generator=generator) < keep_prob
    first = torch.zeros_like(keep)
    first[torch.arange(z.shape[0]), torch.randint(0, m_shared, (z.shape[0],), generator=generator)] = True
    keep = (keep | (~keep.any(dim=1, keepdim=True) & first)).to(z.dtype).to(z.device)
    scale = torch.cat([keep / keep_prob, torch.ones(z.shape[0], z.shape[1] - m_shared, device=z.device,
                                                    dtype=z.dtype)], dim=1)
    return z * scale.unsqueeze(-1)


def bytes_to_tensor(prompts: list[bytes], max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of byte strings to (B, L) ids + (B, L) mask; L = longest (<= max_bytes)."""
    length = max(1, max(len(p) for p in prompts))
    if length > max_bytes:
        raise ValueError(f"prompt of {length} bytes exceeds max_bytes {max_bytes}; cut it in data preparation")
    ids = torch.full((len(prompts), length), BYTE_PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    return ids, ids != BYTE_PAD

