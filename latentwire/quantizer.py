"""Finite scalar quantization (FSQ) of latent slots, so the wire can carry a few bits per slot instead of floats.

FSQ (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple", arXiv:2309.15505) replaces a learned
VQ codebook with a fixed grid. Per slot `z (d_z,)`:

    h      = project_in(z)                                   (n,)  with n = len(levels), a Linear d_z -> n
    half_i = (L_i - 1) (1 - eps_i) / 2,   offset_i = 0.5 if L_i is even else 0,   shift_i = atanh(offset_i / half_i)
    b_i    = tanh(h_i + shift_i) * half_i - offset_i         in (-(L_i-1)/2 - offset_i, (L_i-1)/2 - offset_i)
    r_i    = round(b_i)                                      exactly L_i integers: -(L_i // 2) ... L_i - 1 - L_i // 2
    idx_i  = r_i + L_i // 2                                  per-dimension index in [0, L_i)
    z_hat  = project_out(r / (L // 2))                       (d_z,), a Linear n -> d_z
    code   = sum_i idx_i * prod_{j<i} L_j                    mixed radix, dimension 0 least significant

Rounding uses a straight-through estimator: the forward value is exactly `r` (so `codes_to_latent(code)` rebuilds
the value training saw, bit for bit for the same shapes on the same device) and the gradient is that of `b`. The
even-level half-offset is the paper's; the shift makes h = 0 land on index L_i // 2 (for L_i = 2 that is
impossible, offset > half, so the shift is 0 and h = 0 sits on the decision boundary).
eps_i = min(1e-3, 0.25 / (L_i - 1)) keeps both extreme values reachable for large L_i, where the paper's fixed 1e-3
would cut them off. Levels are capped at 2**16 per dimension (float32 must resolve every step) and 2**32 per slot
(a code is at most 32 bits on the wire, see `latentwire/wire.py` v2).

`SlotQuantizer` applies one FSQ to the M_shared shared slots and another (its own projections, `private_levels`)
to the Σ M_private private slots of the encoder output `z (B, M_total, d_z)`.

Run the tests: `python -m pytest tests/test_quantizer.py -q`. Quick look:
    python -c "import torch; from latentwire.quantizer import FSQ; q = FSQ(64, [8, 5, 5, 5]); \
print(q.bits_per_slot, q(torch.randn(2, 3, 64))[1])"
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import torch
from torch import nn

from latentwire.config import QuantizerConfig, validate_levels, validate_quantizer_config  # noqa: F401  (re-exported)


def bits_for(codebook_size: int) -> int:
    """ceil(log2(codebook_size)): bits that hold any code in [0, codebook_size); codebook_size >= 2."""
    return (codebook_size - 1).bit_length()


def levels_layout_hash(levels: Sequence[int], private_levels: Sequence[int], m_shared: int,
                       m_private_total: int) -> int:
    """Stable 32-bit id of a slot layout (first 4 bytes of a sha256, big-endian); empty private = same as levels."""
    layout = {"kind": "fsq", "levels": [int(v) for v in levels],
              "private_levels": [int(v) for v in (private_levels or levels)],
              "m_shared": int(m_shared), "m_private_total": int(m_private_total)}
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:4], "big")


class FSQ(nn.Module):
    """Finite scalar quantizer of one slot width: `z (..., d_z) -> (z_hat (..., d_z), codes (...) int64)`."""

    def __init__(self, d_z: int, levels: Sequence[int], key: str = "levels"):
        super().__init__()
        validate_levels(levels, key)
        if d_z < 1:
            raise ValueError(f"FSQ d_z must be >= 1, got {d_z}")
        self.d_z, self.levels = d_z, [int(v) for v in levels]
        self.project_in = nn.Linear(d_z, len(self.levels))
        self.project_out = nn.Linear(len(self.levels), d_z)
        lv = torch.tensor(self.levels, dtype=torch.float64)
        eps = torch.clamp(0.25 / (lv - 1), max=1e-3)
        half = (lv - 1) * (1 - eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0).double()
        shift = torch.where(offset < half, torch.atanh(torch.clamp(offset / half, max=0.5)), 0.0)
        # Derived from `levels`, never trained: not saved in checkpoints (the config rebuilds them).
        self.register_buffer("_half", half.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", shift.float(), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)
        basis = [math.prod(self.levels[:i]) for i in range(len(self.levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.int64), persistent=False)

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes per slot: prod(levels)."""
        return math.prod(self.levels)

    @property
    def bits_per_slot(self) -> int:
        """ceil(log2(prod(levels))): bits one code takes on the wire."""
        return bits_for(self.codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`z (..., d_z)` -> `z_hat (..., d_z)` (parameter dtype, straight-through gradients), `codes (...)` int64."""
        if z.dim() < 1 or z.shape[-1] != self.d_z:
            raise ValueError(f"FSQ expects z (..., d_z={self.d_z}), got {tuple(z.shape)}")
        h = self.project_in(z.to(self.project_in.weight.dtype))
        bounded = torch.tanh(h + self._shift) * self._half - self._offset
        rounded = torch.round(bounded)
        # Value exactly `rounded` (x - x == 0), gradient d/d bounded = 1: the straight-through estimator.
        quantized = rounded.detach() + (bounded - bounded.detach())
        indices = (rounded.detach() + self._half_width).long()
        indices = torch.minimum(indices.clamp(min=0), self._levels - 1)  # NaN inputs still give in-range codes
        z_hat = self.project_out(quantized / self._half_width)
        return z_hat, self.indices_to_codes(indices)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """`codes (...)` int in [0, codebook_size) -> per-dimension indices `(..., len(levels))` int64."""
        codes = torch.as_tensor(codes, device=self._basis.device).long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"FSQ codes must be in [0, {self.codebook_size}) for levels {self.levels}, got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return torch.div(codes.unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Per-dimension indices `(..., len(levels))` -> mixed-radix `codes (...)` int64 (dim 0 least significant)."""
        return (indices.long() * self._basis).sum(dim=-1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """`codes (...)` -> `z_hat (..., d_z)`: the very value `forward` returns for inputs with these codes."""
        rounded = (self.codes_to_indices(codes) - self._levels // 2).to(self._half_width.dtype)
        return self.project_out(rounded / self._half_width)

    def extra_repr(self) -> str:
        return f"d_z={self.d_z}, levels={self.levels}, bits_per_slot={self.bits_per_slot}"


class SlotQuantizer(nn.Module):
    """FSQ over the encoder output: `levels` on the first m_shared slots, `private_levels` on the rest."""

    def __init__(self, d_z: int, m_shared: int, m_private_total: int, cfg: QuantizerConfig,
                 key: str = "encoder.quantizer"):
        super().__init__()
        validate_quantizer_config(cfg, key)
        if cfg.kind != "fsq":
            raise ValueError(f"{key}.kind: SlotQuantizer needs 'fsq', got {cfg.kind!r} (with 'off' build none)")
        if m_shared < 0 or m_private_total < 0 or m_shared + m_private_total < 1:
            raise ValueError(f"SlotQuantizer needs m_shared >= 0, m_private_total >= 0 and at least one slot, "
                             f"got m_shared={m_shared}, m_private_total={m_private_total}")
        self.m_shared, self.m_private_total = m_shared, m_private_total
        self.shared_levels = list(cfg.levels)
        self.private_levels = list(cfg.private_levels or cfg.levels)
        self.shared = FSQ(d_z, self.shared_levels, f"{key}.levels")
        self.private = FSQ(d_z, self.private_levels, f"{key}.private_levels") if m_private_total else None

    @property
    def m_total(self) -> int:
        return self.m_shared + self.m_private_total

    def _check_slots(self, n: int, what: str) -> None:
        if n != self.m_total:
            raise ValueError(f"SlotQuantizer expects {what} with M_total = m_shared {self.m_shared} + "
                             f"m_private_total {self.m_private_total} = {self.m_total} slots, got {n}")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`z (B, M_total, d_z)` -> `z_hat (B, M_total, d_z)`, `codes (B, M_total)` int64."""
        if z.dim() != 3:
            raise ValueError(f"SlotQuantizer expects z (B, M_total, d_z), got {tuple(z.shape)}")
        self._check_slots(z.shape[1], "z (B, M_total, d_z)")
        z_hat, codes = self.shared(z[:, : self.m_shared])
        if self.private is not None:
            p_hat, p_codes = self.private(z[:, self.m_shared:])
            z_hat, codes = torch.cat([z_hat, p_hat], dim=1), torch.cat([codes, p_codes], dim=1)
        return z_hat, codes

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """`codes (B, M_total)` (e.g. from `wire.decode_codes_batch`) -> `z_hat (B, M_total, d_z)`."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 2:
            raise ValueError(f"SlotQuantizer.codes_to_latent expects codes (B, M_total), got {tuple(codes.shape)}")
        self._check_slots(codes.shape[1], "codes (B, M_total)")
        z_hat = self.shared.codes_to_latent(codes[:, : self.m_shared])
        if self.private is not None:
            z_hat = torch.cat([z_hat, self.private.codes_to_latent(codes[:, self.m_shared:])], dim=1)
        return z_hat

    def levels_per_slot(self) -> list[int]:
        """Codebook size (product of the FSQ levels) of each of the M_total slots, in slot order."""
        return [math.prod(self.shared_levels)] * self.m_shared + [math.prod(self.private_levels)] * self.m_private_total

    def bits_per_slot(self) -> list[int]:
        """Wire bits of each slot's code: ceil(log2(levels_per_slot()[s]))."""
        return [bits_for(n) for n in self.levels_per_slot()]

    def levels_hash(self) -> int:
        """32-bit id of this layout; a v2 wire payload carries it so a mismatched checkpoint is refused."""
        return levels_layout_hash(self.shared_levels, self.private_levels, self.m_shared, self.m_private_total)
