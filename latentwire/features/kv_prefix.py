"""Cache entries generated from the latent: `features.deep_prefix` and `features.coprocessor`.

Both write per-layer keys and values that the receiver attends to before its own tokens; they differ in what they
read and how many entries they write:

    deep prefix   P (B, M, H), the calibrated soft tokens -> M entries per layer (one per slot)
    coprocessor   mean over the receiver's wire slots (B, d_z) -> `coprocessor_slots` entries per layer

Shapes follow the receiver's cache (GQA-aware): keys and values (B, KV heads, P, head dim) per layer, with KV heads
and head dim from the receiver config. `Receiver.set_kv_source` merges them into the cache on the sequence axis
and keeps the attention mask and positions consistent on every prefill and decode step.
"""

from __future__ import annotations

import torch
import torch.nn as nn


KV = list[tuple[torch.Tensor, torch.Tensor]]  # [(keys, values)] per layer, each (B, KV heads, P, head dim)


def split_kv(flat: torch.Tensor, n_layers: int, kv_heads: int, head_dim: int) -> KV:
    """flat (B, P, n_layers * 2 * kv_heads * head_dim) -> [(keys, values)] per layer, each (B, kv_heads, P, hd)."""
    b, p, _ = flat.shape
    kv = flat.view(b, p, n_layers, 2, kv_heads, head_dim).permute(2, 3, 0, 4, 1, 5)  # (L, 2, B, kv_heads, P, hd)
    return [(kv[i, 0], kv[i, 1]) for i in range(n_layers)]


class DeepPrefix(nn.Module):
    """Per-layer key/value prefixes from the calibrated latent: P (B, M, H) -> M cache entries per layer."""

    def __init__(self, hidden_size: int, n_layers: int, kv_heads: int, head_dim: int, width: int):
        super().__init__()
        self.geometry = (n_layers, kv_heads, head_dim)
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(),
                                 nn.Linear(width, n_layers * 2 * kv_heads * head_dim))

    def forward(self, prefix: torch.Tensor) -> KV:
        return split_kv(self.net(prefix.float()), *self.geometry)


class Coprocessor(nn.Module):
    """KV entries from the pooled latent: slots (B, M, d_z) -> `n_entries` cache entries per layer.

    The slots are mean-pooled (the coprocessor sees what the wire carries, not the adapter's projection) and an MLP
    writes the entries, which join the cache on the sequence axis."""

    def __init__(self, d_z: int, n_layers: int, kv_heads: int, head_dim: int, n_entries: int, width: int):
        super().__init__()
        self.geometry = (n_layers, kv_heads, head_dim)
        self.n_entries = n_entries
        self.net = nn.Sequential(nn.LayerNorm(d_z), nn.Linear(d_z, width), nn.GELU(),
                                 nn.Linear(width, n_entries * n_layers * 2 * kv_heads * head_dim))

    def forward(self, slots: torch.Tensor) -> KV:
        flat = self.net(slots.float().mean(dim=1))  # (B, n_entries * L * 2 * kv_heads * hd)
        return split_kv(flat.view(slots.shape[0], self.n_entries, -1), *self.geometry)
