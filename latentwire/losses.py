"""LatentWire losses, thin over the fused kernels.

`hidden` is always the STUDENT (the receiver reading the latent), gathered at the first K answer positions
before the LM head; teacher logits come from the same frozen receiver reading the full text (and optionally
from larger same-tokenizer teachers). Every example weighs the same, whatever its answer length.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels

IGNORE = -100


def _row_norm(targets: torch.Tensor, norm: float | None) -> float:
    """Multiplier turning a sum over this micro-batch's supervised rows into its share of the global token mean.

    `norm` = world * grad_accum / (supervised rows in the whole global batch), set by the trainer, makes the loss
    (and so the update) independent of how the global batch is laid out over ranks and micro-batches; without it
    the micro-batch mean is used.
    """
    if norm is not None:
        return norm
    return 1.0 / max(1, int((targets != IGNORE).sum()))


def k_token_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               norm: float | None = None) -> torch.Tensor:
    """hidden (B, K, H) student, weight (V, H) LM head, targets (B, K) with -100 past the answer -> scalar CE."""
    b, k, h = hidden.shape
    total = kernels.k_token_cross_entropy(hidden.reshape(b * k, h), weight, targets.reshape(-1),
                                          ignore_index=IGNORE, reduction="sum")
    return total * _row_norm(targets, norm)


def kd_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float, teacher_weights: list[float] | None = None, norm: float | None = None,
            example_weights: torch.Tensor | None = None) -> torch.Tensor:
    """hidden (B, K, H) student; teacher_logits (T, B, K, V) teachers at the same positions -> scalar KD.

    example_weights (B,) (mean 1, e.g. hard-negative weights) scale each example's KD rows; the kernel is then
    called once per example (same total work: only that example's K rows go through the head)."""
    b, k, h = hidden.shape
    t, _, _, v = teacher_logits.shape
    weights = torch.tensor(teacher_weights, dtype=torch.float32) if teacher_weights is not None else None
    mask = targets != IGNORE
    if example_weights is None:
        mean = kernels.kd_softmax_loss(hidden.reshape(b * k, h), weight, teacher_logits.reshape(t, b * k, v),
                                       temperature=temperature, teacher_weights=weights, mask=mask.reshape(-1))
        return mean * int(mask.sum()) * _row_norm(targets, norm)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(b):
        n_valid = int(mask[i].sum())
        if n_valid == 0:
            continue
        mean = kernels.kd_softmax_loss(hidden[i], weight, teacher_logits[:, i], temperature=temperature,
                                       teacher_weights=weights, mask=mask[i])
        total = total + float(example_weights[i]) * mean * n_valid
    return total * _row_norm(targets, norm)


@torch.no_grad()
def teacher_logits_at(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Teacher hidden (B, K, H) -> logits (B, K, V) in fp32: only K rows per example, never the whole text, and
    chunk by chunk of the vocabulary, never through an fp32 copy of a bf16 head (`kernels.lm_head_logits`)."""
    b, k, h = hidden.shape
    return kernels.lm_head_logits(hidden.reshape(b * k, h), weight).view(b, k, -1)


@torch.no_grad()
def first_token_accuracy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of examples whose argmax at answer position 0 is the gold first answer token (hidden (B, K, H)
    student, targets (B, K)); the argmax walks the vocabulary in chunks (`kernels.lm_head_argmax`)."""
    first = kernels.lm_head_argmax(hidden[:, 0], weight)
    return float((first == targets[:, 0]).float().mean())


class LMHeadLoss(nn.Module):
    """The fused losses against one receiver's frozen LM head, run as a module call.

    Under ZeRO-3 the head is partitioned. Registering it as an external parameter of this module makes DeepSpeed
    gather it for this forward and again for the backward of `hidden` (the kernels' saved weight), exactly as it
    does for an ordinary nn.Linear. The head stays owned by its receiver (not a child here), so it is counted once.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        object.__setattr__(self, "_head", head)
        weight = head.weight
        if hasattr(weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    @property
    def weight(self) -> torch.Tensor:
        return self._head.weight

    def forward(self, student: torch.Tensor, targets: torch.Tensor | None = None,
                teacher_hidden: torch.Tensor | None = None, temperature: float = 1.0,
                extra_teacher_logits: torch.Tensor | None = None, teacher_weights: list[float] | None = None,
                norm: float | None = None,
                cached_teachers: list[tuple[torch.Tensor, torch.Tensor, float]] | None = None,
                hard_negative_alpha: float = 0.0) -> dict:
        """student (B, K, H); targets (B, K); teacher_hidden (B, K, H) from the text pass (no grad);
        extra_teacher_logits (T', B, K, V) from larger live teachers; teacher_weights one weight per dense teacher
        (text teacher first; None = 1 each); norm: see `_row_norm`; cached_teachers [(topk_ids (B, K, k),
        topk_logprobs (B, K, k), weight)] from offline caches. Without targets: {"logits": (B, K, V) fp32}.

        The dense teachers form one mixture scored by kd_softmax_loss, each cached teacher is scored by
        kd_topk_loss, and "kd" = (W_dense * KD_dense + sum_c w_c * KD_c) / (W_dense + sum_c w_c).
        hard_negative_alpha > 0 weights each example's dense KD by `hard_negative_weights` (mean 1:
        examples the student gets wrong at answer token 0 and whose teacher is uncertain count more)."""
        weight = self.weight
        if targets is None:
            return {"logits": teacher_logits_at(student, weight)}
        out = {"ce": k_token_ce(student, weight, targets, norm),
               "first_tok_acc": first_token_accuracy(student.detach(), weight, targets)}
        teachers = []
        if teacher_hidden is not None:
            teachers.append(teacher_logits_at(teacher_hidden, weight))
        if extra_teacher_logits is not None:
            teachers += list(extra_teacher_logits)
        terms = []  # (weight, KD) of the dense mixture and of each cached teacher
        if teachers:
            dense_weight = sum(teacher_weights) if teacher_weights is not None else float(len(teachers))
            example_weights = None
            if hard_negative_alpha > 0:
                example_weights = hard_negative_weights(teacher_logits_at(student[:, :1].detach(), weight)[:, 0],
                                                        teachers[0][:, 0], targets[:, 0], hard_negative_alpha)
            terms.append((dense_weight, kd_loss(student, weight, torch.stack(teachers), targets, temperature,
                                                teacher_weights, norm, example_weights)))
        for topk_ids, topk_logprobs, cached_weight in cached_teachers or []:
            terms.append((float(cached_weight), self._kd_topk(student, topk_ids, topk_logprobs, targets, temperature,
                                                              norm)))
        if len(terms) == 1:
            out["kd"] = terms[0][1]
        elif terms:
            out["kd"] = sum(w * kd for w, kd in terms) / sum(w for w, _ in terms)
        return out

    def _kd_topk(self, student: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 targets: torch.Tensor, temperature: float, norm: float | None) -> torch.Tensor:
        """Sparse KD of student (B, K, H) against one cached teacher's top-k (B, K, k), normalized like kd_loss."""
        b, k, h = student.shape
        top = topk_ids.shape[-1]
        mask = (targets != IGNORE).reshape(-1)
        mean = kernels.kd_topk_loss(student.reshape(b * k, h), self.weight, topk_ids.reshape(b * k, top),
                                    topk_logprobs.reshape(b * k, top), temperature=temperature, mask=mask)
        return mean * int(mask.sum()) * _row_norm(targets, norm)


def hard_negative_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                          alpha: float) -> torch.Tensor:
    """Per-example KD weights (B,) with mean 1, so the KD loss keeps its scale.

    student_logits (B, V) and teacher_logits (B, V) at answer position 0, targets (B,) the gold first token.
    hardness_b = (1 - p_student(gold)) + H(teacher_b) / log V, both in [0, 1]; w_b = exp(alpha * hardness_b),
    normalized to mean 1 over the batch (alpha = 0 gives all ones)."""
    with torch.no_grad():
        p_gold = student_logits.float().softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logp = teacher_logits.float().log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1) / torch.log(torch.tensor(float(teacher_logits.shape[-1])))
        weights = torch.exp(alpha * ((1.0 - p_gold) + entropy))
        return weights / weights.mean()
