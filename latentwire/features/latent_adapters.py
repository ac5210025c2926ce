"""`features.latent_adapters`: gated cross-attention from the receiver's residual stream to the latent.

At each configured decoder layer (evenly spaced by default) a forward hook adds

    h <- h + tanh(gate) * W_o · attention(q = W_q · norm(h), k = W_k · P, v = W_v · P)

where P (B, M, H) are the calibrated soft tokens of the example. The gate starts at 0, so the receiver is unchanged
at initialization (Flamingo's tanh gating). The hook fires on every forward while a latent is installed: the
teacher-forced pass, scoring, the generation prefill and every decode step (h is then (B, 1, H)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def adapter_layers(n_layers: int, count: int, explicit: list[int]) -> list[int]:
    """The decoder layers that get a block: `explicit` if given, else `count` evenly spaced, ending at the last."""
    if explicit:
        bad = [i for i in explicit if i >= n_layers]
        if bad:
            raise ValueError(f"features.latent_adapter_layers {explicit}: layers {bad} do not exist "
                             f"(the receiver has {n_layers})")
        return sorted(set(explicit))
    count = min(count, n_layers)
    return sorted({round((i + 1) * n_layers / count) - 1 for i in range(count)})


class LatentCrossAttention(nn.Module):
    """hidden (B, L, H) attends to prefix (B, M, H); returns the updated hidden (B, L, H)."""

    def __init__(self, hidden_size: int, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(hidden_size)
        self.norm_latent = nn.LayerNorm(hidden_size)
        self.q = nn.Linear(hidden_size, width, bias=False)
        self.kv = nn.Linear(hidden_size, 2 * width, bias=False)
        self.out = nn.Linear(width, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))  # shape (1,): DeepSpeed cannot broadcast 0-d tensors

    def forward(self, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        b, length, _ = hidden.shape
        q = self.q(self.norm(hidden.float())).view(b, length, self.n_heads, -1).transpose(1, 2)
        k, v = self.kv(self.norm_latent(prefix.float())).view(b, prefix.shape[1], 2, self.n_heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, L, d)
        delta = self.out(attended.transpose(1, 2).reshape(b, length, -1))
        return hidden + (torch.tanh(self.gate) * delta).to(hidden.dtype)


def attach(receiver, blocks: nn.ModuleDict) -> None:
    """Register one forward hook per block on its decoder layer; blocks are keyed by layer index (as strings)."""
    layers = receiver.decoder_layers()
    for handle in receiver.feature_hooks:  # a model rebuilt over the same receivers (stage hand-off) replaces them
        handle.remove()
    receiver.feature_hooks = [layers[int(index)].register_forward_hook(_make_hook(receiver, block))
                              for index, block in blocks.items()]


def _make_hook(receiver, block: LatentCrossAttention):
    def hook(module, args, output):
        if receiver.latent is None:
            return None
        if isinstance(output, tuple):
            return (block(output[0], receiver.latent.prefix),) + output[1:]
        return block(output, receiver.latent.prefix)

    return hook
