"""Inference API: compress prompts to wire payloads on one side, answer from them with any receiver on the other.

    from latentwire import Interlingua

    lw = Interlingua.from_checkpoint("runs/demo/checkpoints/latest")
    prompts = [lw.prompt(context="The Eiffel Tower is in Paris.", question="Where is the Eiffel Tower?")]
    payloads = lw.encode(prompts, precision="int8")         # list[bytes], one self-describing payload per prompt
    answers = lw.generate("llama", payloads, None, max_new_tokens=12)   # list[str]

`encode` and `generate` run in batches of `eval.batch_size`. A payload carries its own shape and precision (see
`latentwire/wire.py`), so the receiving side needs only the checkpoint, not the sender's settings. `generate`
builds exactly the sequence evaluation's `latent` path builds, [P][BOS?][anchor], and decodes greedily until EOS
or `max_new_tokens`. The checkpoints this repository trains compress the whole prompt, question included, so pass
`questions=None`; with questions, each is shown to the receiver as "Question: ...\\n" between the latent and the
anchor (useful only for a model trained to read it there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from latentwire import features
from latentwire.data import PROMPT_TEMPLATE, Example, prompt_text
from latentwire.encoder import bytes_to_tensor
from latentwire.eval import latent_inputs


class Interlingua:
    """A trained encoder + adapters + frozen receivers, rebuilt from one checkpoint directory."""

    def __init__(self, cfg, model, device: str | torch.device | None = None):
        self.cfg = cfg
        self.model = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: list[str] | None = None,
                        device: str | torch.device | None = None) -> "Interlingua":
        """Load `RUN/checkpoints/<step|latest|best>`; `overrides` are `--set`-style strings ("eval.batch_size=4")."""
        from latentwire.checkpoint import load_checkpoint_model

        cfg, model = load_checkpoint_model(path, overrides)
        return cls(cfg, model, device)

    @property
    def receivers(self) -> list[str]:
        return list(self.model.names)

    @property
    def max_prompt_bytes(self) -> int:
        return self.cfg.data.max_prompt_bytes

    def prompt(self, context: str, question: str) -> str:
        """The prompt in the training format, the context cut (at a UTF-8 boundary) to fit max_prompt_bytes."""
        return prompt_text(Example("", "api", "", context, question, [""]), self.max_prompt_bytes)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], precision: str = "int8", group_size: int | None = None) -> list[bytes]:
        """One wire payload per prompt (fp16 | int8 | int4, or "code" when the checkpoint has a quantizer).
        Prompts longer than max_prompt_bytes are an error: build them with `prompt(context, question)`, which
        cuts the context and keeps the question."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got one string")
        group = group_size or self.cfg.eval.group_size
        payloads: list[bytes] = []
        for start in range(0, len(prompts), self.cfg.eval.batch_size):
            chunk = [p.encode("utf-8") for p in prompts[start:start + self.cfg.eval.batch_size]]
            too_long = [start + i for i, b in enumerate(chunk) if len(b) > self.max_prompt_bytes]
            if too_long:
                raise ValueError(f"prompt(s) {too_long[:5]} exceed max_prompt_bytes={self.max_prompt_bytes}; "
                                 "use Interlingua.prompt(context, question) to cut the context")
            byte_ids, byte_mask = bytes_to_tensor(chunk, self.max_prompt_bytes)
            z, codes = self.model.encoder(byte_ids.to(self.device), byte_mask.to(self.device), with_codes=True)
            payloads += self.model.to_wire(z, codes, precision, group)
        return payloads

    def decode(self, payloads: Sequence[bytes]) -> torch.Tensor:
        """Payloads -> latents (B, M_total, d_z) float32, checking each payload's header and length."""
        return self.model.from_wire(list(payloads))

    @torch.no_grad()
    def generate(self, receiver: str, payloads: Sequence[bytes], questions: Sequence[str] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers of `receiver` reading each payload; stops at EOS or max_new_tokens
        (default eval.max_new_tokens)."""
        if receiver not in self.model.names:
            raise KeyError(f"unknown receiver {receiver!r}; this checkpoint has {self.receivers}")
        if questions is not None and len(questions) != len(payloads):
            raise ValueError(f"got {len(questions)} questions for {len(payloads)} payloads")
        steps = max_new_tokens or self.cfg.eval.max_new_tokens
        rec = self.model.receivers[receiver]
        size = self.cfg.eval.batch_size
        answers: list[str] = []
        for start in range(0, len(payloads), size):
            z = self.decode(payloads[start:start + size]).to(self.device)
            between = None
            if questions is not None:
                between = [PROMPT_TEMPLATE.split("\n")[1].format(question=q) + "\n"
                           for q in questions[start:start + size]]
            embeds, mask = latent_inputs(self.model, receiver, z, between)
            with features.latent_context(self.model, receiver, z):
                tokens = rec.generate(mask, steps, inputs_embeds=embeds)
            answers += [rec.decode(t) for t in tokens]
        return answers
