"""The module one DeepSpeed engine wraps: byte encoder + per-receiver adapters (trainable) + frozen receivers.

`LatentWire.forward(batch, step)` runs one training micro-batch: encode bytes once, then per receiver exactly
one latent teacher-forced pass (student) and one text pass (teacher, no grad), and the fused K-token CE + KD.
`LatentWire.encode` / `prefix` are the pieces evaluation and the inference API reuse.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from latentwire.adapters import Adapter
from latentwire.config import Config
from latentwire.encoder import ByteEncoder, drop_shared_slots
from latentwire.losses import LMHeadLoss
from latentwire.receivers import Receiver


def keep_probability(cfg: Config, step: int) -> float:
    """Curriculum: shared-slot keep probability, linear from start to end over keep_ramp_steps."""
    cur = cfg.curriculum
    if cur.keep_ramp_steps <= 0:
        return cur.latent_keep_end
    t = min(1.0, step / cur.keep_ramp_steps)
    return cur.latent_keep_start + t * (cur.latent_keep_end - cur.latent_keep_start)


class LatentWire(nn.Module):
    def __init__(self, cfg: Config, receivers: list[Receiver]):
        super().__init__()
        self.cfg = cfg
        self.names = [r.cfg.name for r in receivers]
        self.encoder = ByteEncoder(cfg.encoder, len(receivers), cfg.data.max_prompt_bytes)
        n_slots = cfg.encoder.m_shared + cfg.encoder.m_private
        self.adapters = nn.ModuleDict({
            r.cfg.name: Adapter(cfg.adapter, cfg.encoder.d_z, n_slots, r.hidden_size, r.embed_rms)
            for r in receivers})
        self.receivers = nn.ModuleDict({r.cfg.name: r for r in receivers})
        self.heads = nn.ModuleDict({r.cfg.name: LMHeadLoss(r.model.get_output_embeddings()) for r in receivers})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not a frozen receiver weight (encoder, adapters, their buffers)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("receivers.")}

    def encode(self, byte_ids: torch.Tensor, byte_mask: torch.Tensor) -> torch.Tensor:
        """bytes (B, L), mask (B, L) -> Z (B, M_total, d_z): everything that goes on the wire."""
        return self.encoder(byte_ids, byte_mask)

    def prefix(self, z: torch.Tensor, name: str) -> torch.Tensor:
        """Z (B, M_total, d_z) -> calibrated soft tokens P (B, M_shared + M_private, H) for receiver `name`."""
        return self.adapters[name](self.encoder.slots_for(z, self.names.index(name)))

    def forward(self, batch: dict, step: int) -> dict:
        cfg = self.cfg
        z = self.encode(batch["bytes"], batch["byte_mask"])
        keep = keep_probability(cfg, step)
        if keep < 1.0:
            gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
            z = drop_shared_slots(z, cfg.encoder.m_shared, keep, gen)
        k = cfg.losses.k_tokens
        total = z.new_zeros(())
        parts: dict[str, float] = {}
        for name, receiver in self.receivers.items():
            rb = batch["receivers"][name]
            prefix = self.prefix(z, name)
            student = receiver.latent_pass(prefix, rb["latent_ids"], rb["latent_mask"], rb["latent_answer_start"], k)
            teacher_hidden = None
            if cfg.losses.kd_weight > 0:
                teacher_hidden = receiver.text_pass(rb["text_ids"], rb["text_mask"], rb["text_answer_start"], k)
            res = self.heads[name](student, rb["targets"], teacher_hidden, cfg.losses.kd_temperature)
            loss = cfg.losses.ce_weight * res["ce"]
            parts[f"ce/{name}"] = float(res["ce"].detach())
            if "kd" in res:
                loss = loss + cfg.losses.kd_weight * res["kd"]
                parts[f"kd/{name}"] = float(res["kd"].detach())
            parts[f"first_tok_acc/{name}"] = res["first_tok_acc"]
            total = total + loss
        return {"loss": total / len(self.receivers), "parts": parts}
