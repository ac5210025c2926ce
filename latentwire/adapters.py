"""Per-receiver adapter: latent slots Z_m (B, M_m, d_z) -> soft tokens P_m (B, M_m, H_m) in the receiver's
input-embedding space, with learned slot positions and per-example RMS calibration (`kernels.rms_calibrate`) to
the RMS of that receiver's input-embedding table.

No gold-derived quantity enters here: the adapter sees only the latent.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels
from latentwire.config import AdapterConfig


class Adapter(nn.Module):
    def __init__(self, cfg: AdapterConfig, d_z: int, n_slots: int, hidden_size: int, target_rms: float):
        super().__init__()
        self.cfg = cfg
        self.n_slots = n_slots
        self.norm = nn.LayerNorm(d_z)
        self.mlp = nn.Sequential(nn.Linear(d_z, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, hidden_size))
        self.slot_pos = nn.Parameter(torch.randn(n_slots, hidden_size) * 0.02)
        # The calibration target is a property of the frozen receiver, saved with the adapter.
        self.register_buffer("target_rms", torch.full((1,), float(target_rms) * cfg.rms_scale), persistent=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, M, d_z) -> P (B, M, H)."""
        if z.shape[1] != self.n_slots:
            raise ValueError(f"adapter expects {self.n_slots} slots, got {z.shape[1]}")
        p = self.mlp(self.norm(z)) + self.slot_pos
        if self.cfg.calibrate:
            p = kernels.rms_calibrate(p, float(self.target_rms))
        return p


@torch.no_grad()
def embedding_rms(embedding_weight: torch.Tensor) -> float:
    """RMS over all entries of an input-embedding table (V, H), computed once per receiver in fp32."""
    w = embedding_weight.detach().float()
    return float(w.pow(2).mean().sqrt())
