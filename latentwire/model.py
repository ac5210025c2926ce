"""The module one DeepSpeed engine wraps: byte encoder + per-receiver adapters (trainable) + frozen receivers.

`LatentWire.forward(batch, step)` runs one training micro-batch: encode bytes once, then per receiver exactly
one latent teacher-forced pass (student) and one text pass (teacher, no grad), and the fused K-token CE + KD.
`LatentWire.encode` / `prefix` are the pieces evaluation and the inference API reuse. Larger same-tokenizer
teachers (latentwire/teachers.py) are attached with `attach_teachers`, outside the module tree.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentwire import curriculum, features, wire
from latentwire.adapters import Adapter
from latentwire.config import Config
from latentwire.encoder import ByteEncoder
from latentwire.losses import LMHeadLoss
from latentwire.distributed import is_partitioned
from latentwire.receivers import Receiver
from latentwire.teachers import kd_targets


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
        # losses.span_weight: a training-only pointer from the encoder's byte states to the answer's first and last
        # byte (span_loss); never on the wire.
        self.span_head = nn.Linear(cfg.encoder.d_model, 2) if cfg.losses.span_weight > 0 else None
        # {receiver name: [LiveTeacher | CachedTeacher]}: a plain dict, so teachers are not submodules (no optimizer
        # state, not in checkpoints, not wrapped by the training engine).
        self.teachers: dict[str, list] = {}
        self.curriculum_state: dict = {}  # accuracy-driven curriculum state (curriculum.after_step), rank-identical
        # Optional features (latentwire/features): LoRA goes into the receivers, the rest lives here.
        self.feature_modules = features.build(self)

    def attach_teachers(self, teachers: dict[str, list]) -> None:
        """Use the teachers of `latentwire.teachers.load_teachers` in every following training forward."""
        unknown = sorted(set(teachers) - set(self.names))
        if unknown:
            raise ValueError(f"teachers given for unknown receiver(s) {unknown}; receivers are {self.names}")
        self.teachers = {name: list(ts) for name, ts in teachers.items() if ts}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not a frozen receiver weight (encoder, adapters, feature modules, LoRA weights)."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith("receivers.") or features.is_trainable_receiver_key(k)}

    def encode(self, byte_ids: torch.Tensor, byte_mask: torch.Tensor) -> torch.Tensor:
        """bytes (B, L), mask (B, L) -> Z (B, M_total, d_z): everything that goes on the wire."""
        return self.encoder(byte_ids, byte_mask)

    def to_wire(self, z: torch.Tensor, codes: torch.Tensor | None, precision: str, group_size: int) -> list[bytes]:
        """One payload per example: Z (B, M_total, d_z) as fp16 / int8 / int4 (wire v1), or the quantizer's codes
        (B, M_total) bit-packed (precision "code", wire v2, its header carrying the levels' hash)."""
        if precision != "code":
            return wire.encode_batch(z.float().cpu(), precision, group_size)
        q = self.encoder.quantizer
        if q is None or codes is None:
            raise ValueError("precision 'code' needs encoder.quantizer on (this model sends float slots)")
        return wire.encode_codes_batch(codes.cpu(), q.levels_per_slot(), q.levels_hash())

    def from_wire(self, payloads: list[bytes]) -> torch.Tensor:
        """Payloads (one batch, one version) -> Z (B, M_total, d_z) float32 on the encoder's device: what the
        receivers read. Malformed payloads raise wire.WireFormatError."""
        device = next(self.encoder.parameters()).device
        if payloads and wire.payload_version(payloads[0]) == 2:
            q = self.encoder.quantizer
            if q is None:
                raise wire.WireFormatError("a code payload (wire v2) for a model without encoder.quantizer")
            codes = wire.decode_codes_batch(list(payloads), q.levels_per_slot(), q.levels_hash())
            return q.codes_to_latent(codes.to(device)).float()
        return wire.decode_batch(list(payloads)).to(device)

    def payload_bits_ideal(self, precision: str) -> float:
        """Bits of the slots alone (no header, no scales): M_total * d_z * bits, or the codes' bits."""
        if precision == "code":
            return float(sum(self.encoder.quantizer.bits_per_slot()))
        return float(self.encoder.n_slots * self.cfg.encoder.d_z * {"fp16": 16, "int8": 8, "int4": 4}[precision])

    def prefix(self, z: torch.Tensor, name: str) -> torch.Tensor:
        """Z (B, M_total, d_z) -> calibrated soft tokens P (B, M_shared + M_private, H) for receiver `name`."""
        return self.adapters[name](self.encoder.slots_for(z, self.names.index(name)))

    def forward(self, batch: dict, step: int, diagnose: bool = False) -> dict:
        """One training micro-batch -> {"loss": scalar, "parts": {name: float}}. With `diagnose` (the trainer asks
        every train.diagnostics_every steps) the parts also hold `diagnostics`, taken here, before the engine's
        backward hooks are attached to the outputs."""
        cfg = self.cfg
        span = None
        if self.span_head is not None:
            z, states = self.encoder(batch["bytes"], batch["byte_mask"], with_states=True)
            span = self.span_loss(states, batch["byte_mask"], batch["span"])
        else:
            z = self.encode(batch["bytes"], batch["byte_mask"])
        z_wire = z  # what the encoder emits, before curriculum dropout: the diagnostics look at this
        z = curriculum.slot_dropout(z, cfg, step)  # latent dropout of shared slots, keyed by the step
        k = cfg.losses.k_tokens
        total = z.new_zeros(())
        parts: dict[str, float] = {}
        parts.update(curriculum.on_batch_start(self, batch, step))  # adaptive K masks targets
        parts.update(features.metrics(self))
        terms: dict[str, torch.Tensor] = {}  # each loss term as it enters the total (diagnostics only)
        first_logits: dict[str, torch.Tensor] = {}
        for name, receiver in self.receivers.items():
            rb = batch["receivers"][name]
            prefix = curriculum.warmup_prefix(self, name, self.prefix(z, name), rb, step)
            with features.latent_context(self, name, z, prefix):  # the student reads the latent with its features
                student = receiver.latent_pass(prefix, rb["latent_ids"], rb["latent_mask"],
                                               rb["latent_answer_start"], k)
            kd_inputs = {}
            if cfg.losses.kd_weight > 0:  # text teacher (+ live and cached teachers): see latentwire/teachers.py
                kd_inputs = kd_targets(receiver, self.teachers.get(name, []), rb, batch["ids"], k,
                                       cfg.losses.text_teacher_weight)
            res = self.heads[name](student, rb["targets"], temperature=cfg.losses.kd_temperature,
                                   norm=rb.get("loss_norm"), hard_negative_alpha=cfg.curriculum.hard_negative_alpha,
                                   **kd_inputs)
            loss = cfg.losses.ce_weight * res["ce"]
            parts[f"ce/{name}"] = float(res["ce"].detach())
            first_weight = curriculum.first_token_weight(cfg, step)
            if first_weight > 0:  # curriculum: extra CE on answer token 0, normalised like every other term
                first = self.heads[name](student[:, :1], rb["targets"][:, :1], norm=rb.get("loss_norm_first"))
                loss = loss + first_weight * first["ce"]
            if "kd" in res:
                loss = loss + cfg.losses.kd_weight * res["kd"]
                parts[f"kd/{name}"] = float(res["kd"].detach())
            parts[f"first_tok_acc/{name}"] = res["first_tok_acc"]
            if cfg.losses.reconstruction_weight > 0:
                with features.latent_context(self, name, z, prefix):
                    recon = self.reconstruction(name, prefix, rb)
                loss = loss + cfg.losses.reconstruction_weight * recon
                parts[f"recon/{name}"] = float(recon.detach())
            total = total + loss
            if diagnose:
                n_recv = len(self.receivers)
                first_logits[name] = self.heads[name](student[:, :1].detach())["logits"][:, 0]
                terms[f"ce/{name}"] = cfg.losses.ce_weight * res["ce"] / n_recv
                if "kd" in res:
                    terms[f"kd/{name}"] = cfg.losses.kd_weight * res["kd"] / n_recv
        total = total / len(self.receivers)
        if span is not None:
            total = total + cfg.losses.span_weight * span
            parts["span"] = float(span.detach())
        if diagnose:
            parts.update(self.diagnostics(z_wire, first_logits, terms))
        return {"loss": total, "parts": parts}

    def span_loss(self, states: torch.Tensor, byte_mask: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """Auxiliary extractive-QA loss (losses.span_weight, the span supervision of BiDAF-style readers): from the
        encoder's final byte states (B, L, d), the mean over rows with a span of the cross-entropies of the answer's
        first and of its last byte among the prompt's real bytes. It gives the encoder a direct signal for WHERE
        the asked fact is, which the latent pooler can then read, instead of only the receivers' answer CE
        flowing back through the slots. Rows whose context lacks the answer (span -100) add nothing."""
        logits = self.span_head(states).float().masked_fill(~byte_mask.unsqueeze(-1), float("-inf"))  # (B, L, 2)
        valid = span[:, 0] >= 0
        if not bool(valid.any()):
            return logits.masked_fill(~byte_mask.unsqueeze(-1), 0.0).sum() * 0.0  # keeps the graph on every rank
        ce = [F.cross_entropy(logits[valid, :, j], span[valid, j]) for j in (0, 1)]
        return (ce[0] + ce[1]) / 2

    def reconstruction(self, name: str, prefix: torch.Tensor, rb: dict) -> torch.Tensor:
        """Auxiliary loss (losses.reconstruction_weight, as ICAE / ARC-Encoder pretrain their encoders): receiver
        `name` reads [P (B, M, H)][BOS?][prompt] teacher-forced and must predict every prompt token from P alone;
        the mean token CE over this micro-batch. It trains the latent to carry the whole context, facts the
        question did not ask about included, which the receiver then reads with its own text circuits."""
        receiver = self.receivers[name]
        ids, mask = rb["text_ids"], rb["text_mask"]
        start = 1 if receiver.contract.text_bos else 0  # the first prompt token inside the text sequence
        ends = rb["text_answer_start"] - len(receiver.contract.anchor_ids)  # the prompt stops at the anchor
        k = int(ends.max()) - start
        hidden = receiver.latent_pass(prefix, ids, mask, start, k)  # (B, k, H): position t predicts prompt token t
        positions = torch.arange(start, start + k, device=ids.device)
        targets = ids[:, start:start + k].masked_fill(positions[None] >= ends[:, None], -100)
        return self.heads[name](hidden, targets)["ce"]

    def diagnostics(self, z: torch.Tensor, first_logits: dict[str, torch.Tensor],
                    terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Collapse diagnostics of one micro-batch, before its backward: first-token diversity per receiver (one
        first token predicted for every example is how collapse shows first) from `first_logits` (B, V), mean
        cosine between two slots of one example of z (B, M, d_z), and the gradient norm at z of each loss term in
        `terms`. The gradient norms are skipped under ZeRO-3, where a second backward through partitioned
        receivers would upset DeepSpeed's hooks."""
        parts = {}
        for name, logits in first_logits.items():
            first = logits.argmax(-1)
            parts[f"diversity/{name}"] = first.unique().numel() / first.shape[0]
        unit = nn.functional.normalize(z.detach().float(), dim=-1)  # (B, M, d_z)
        gram = unit @ unit.transpose(1, 2)  # (B, M, M) cosine between every two slots of one example
        off_diagonal = ~torch.eye(gram.shape[1], dtype=torch.bool, device=gram.device)
        parts["slot_cosine"] = float(gram[:, off_diagonal].mean()) if gram.shape[1] > 1 else 1.0
        partitioned = any(is_partitioned(p) for r in self.receivers.values() for p in r.parameters())
        if torch.is_grad_enabled() and z.requires_grad and not partitioned:
            for key, term in terms.items():
                (grad,) = torch.autograd.grad(term, z, retain_graph=True)
                parts[f"grad_norm_latent/{key}"] = float(grad.norm())
        return parts
