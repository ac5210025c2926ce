"""Curriculum: pure functions of the global step (and of all-reduced metrics), so every rank computes the same.

    keep_probability    shared-slot keep probability, linear from latent_keep_start to latent_keep_end
    k_at                adaptive K: supervised answer tokens, ramped by step or advanced by first-token accuracy
    first_token_weight  extra CE weight on answer token 0, linear from start to end
    text_blend          text/latent warm-up: share of pooled text embeddings mixed into the latent prefix
    stage_at / stage_config / handoff_state
                        staged latent length (e.g. M = 64 -> 48 -> 32) and the weight hand-off between stages
    hard_negative_weights
                        per-example KD weights from low first-token accuracy and high teacher entropy (mean 1)

Stage hand-off rule: the pooler queries and the adapters' slot positions of the SHARED slots are resampled to the
new M by linear interpolation along the slot axis (align_corners, so the first and last slot keep their vectors);
private slots and every other weight are carried over unchanged; the optimizer starts fresh.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from latentwire.config import Config


def _linear(start: float, end: float, ramp: int, step: int) -> float:
    if ramp <= 0:
        return end
    t = min(1.0, step / ramp)
    return start + t * (end - start)


def keep_probability(cfg: Config, step: int) -> float:
    """Shared-slot keep probability at `step`, linear from latent_keep_start to latent_keep_end."""
    cur = cfg.curriculum
    return _linear(cur.latent_keep_start, cur.latent_keep_end, cur.keep_ramp_steps, step)


def slot_dropout(z: torch.Tensor, cfg: Config, step: int) -> torch.Tensor:
    """Latent dropout of the step: z (B, M_total, d_z) with shared slots dropped (Bernoulli keep_probability, at
    least one kept per example, kept slots rescaled by 1/keep). The mask comes from a generator seeded by
    (train.seed, step) alone, so every rank drops the same slots."""
    from latentwire.encoder import drop_shared_slots

    keep = keep_probability(cfg, step)
    if keep >= 1.0:
        return z
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    return drop_shared_slots(z, cfg.encoder.m_shared, keep, gen)


def k_at(cfg: Config, step: int, state: dict | None = None) -> int:
    """Supervised answer tokens at `step`: losses.k_tokens unless curriculum.k_start is set.

    With k_acc_threshold > 0 the value is `state["k"]` (advanced by `advance_k` from all-reduced accuracy), else K
    grows linearly from k_start to losses.k_tokens over k_ramp_steps."""
    cur, k_max = cfg.curriculum, cfg.losses.k_tokens
    if cur.k_start <= 0:
        return k_max
    if cur.k_acc_threshold > 0:
        return int((state or {}).get("k", cur.k_start))
    return int(round(_linear(cur.k_start, k_max, cur.k_ramp_steps, step)))


def advance_k(cfg: Config, state: dict, first_tok_acc: float) -> dict:
    """Accuracy-driven K: one more token after a step whose (all-reduced, so rank-identical) first-token accuracy
    reached curriculum.k_acc_threshold. Returns the new state; the trainer keeps it in trainer_state.json."""
    cur = cfg.curriculum
    k = int(state.get("k", cur.k_start or cfg.losses.k_tokens))
    if cur.k_acc_threshold > 0 and first_tok_acc >= cur.k_acc_threshold:
        k = min(cfg.losses.k_tokens, k + 1)
    return {**state, "k": k}


def mask_targets(targets: torch.Tensor, k: int) -> torch.Tensor:
    """targets (B, K_max) -> a copy with positions >= k ignored (-100)."""
    out = targets.clone()
    out[:, k:] = -100
    return out


def first_token_weight(cfg: Config, step: int) -> float:
    cur = cfg.curriculum
    return _linear(cur.first_tok_weight_start, cur.first_tok_weight_end, cur.first_tok_ramp_steps, step)


def text_blend(cfg: Config, step: int) -> float:
    """Text/latent warm-up: weight of the pooled text embeddings in the prefix, 1 at step 0 down to 0 at
    text_warmup_steps (0 afterwards, and always 0 when text_warmup_steps is 0)."""
    n = cfg.curriculum.text_warmup_steps
    return 0.0 if n <= 0 else max(0.0, 1.0 - step / n)


def pooled_text_prefix(embeds: torch.Tensor, mask: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Text embeddings (B, T, H) with mask (B, T) -> (B, n_slots, H): each slot the mean of one contiguous share of
    that row's real tokens (padding excluded), the text-side counterpart of the latent prefix."""
    b, t, h = embeds.shape
    lengths = mask.sum(1).clamp(min=1)  # (B,)
    index = torch.arange(t, device=embeds.device).unsqueeze(0)
    slot = (index * n_slots // lengths.unsqueeze(1)).clamp(max=n_slots - 1)  # (B, T) slot of each token
    weights = F.one_hot(slot, n_slots).to(embeds.dtype) * mask.unsqueeze(-1).to(embeds.dtype)  # (B, T, M)
    return (weights.transpose(1, 2) @ embeds) / weights.sum(1).clamp(min=1).unsqueeze(-1)


def stage_at(cfg: Config, step: int) -> int:
    """Index of the latent-length stage that trains optimizer step `step` (0 without staged M)."""
    return sum(1 for start in cfg.curriculum.stage_steps if step >= start)


def stage_config(cfg: Config, stage: int) -> Config:
    """A copy of `cfg` whose encoder.m_shared is the M of `stage`."""
    new = copy.deepcopy(cfg)
    new.encoder.m_shared = cfg.curriculum.m_stages[stage]
    return new


def _resize_slots(table: torch.Tensor, m_old: int, m_new: int) -> torch.Tensor:
    """table (M_old + rest, d) -> (M_new + rest, d): the first m_old rows (shared slots) linearly resampled."""
    shared, rest = table[:m_old], table[m_old:]
    if m_old == m_new:
        return table.clone()
    if m_old == 1:
        resized = shared.expand(m_new, -1)
    else:
        resized = F.interpolate(shared.T.unsqueeze(0).float(), size=m_new, mode="linear", align_corners=True)[0].T
    return torch.cat([resized.to(table.dtype), rest], dim=0)


def handoff_state(state: dict[str, torch.Tensor], m_old: int, m_new: int) -> dict[str, torch.Tensor]:
    """Trainable state of a stage with M = m_old -> the state the next stage (M = m_new) starts from (module doc)."""
    out = {}
    for key, value in state.items():
        if key == "encoder.pooler.queries" or (key.startswith("adapters.") and key.endswith(".slot_pos")):
            out[key] = _resize_slots(value, m_old, m_new)
        else:
            out[key] = value.clone()
    return out


def handoff_model(model, stage: int):
    """The LatentWire of curriculum stage `stage`, built over the same receivers, starting from `model`'s trained
    weights (resized by `handoff_state`). The trainer then builds a fresh optimizer over its trainable parameters."""
    from latentwire.model import LatentWire

    new_cfg = stage_config(model.cfg, stage)
    state = handoff_state(model.trainable_state_dict(), model.cfg.encoder.m_shared, new_cfg.encoder.m_shared)
    new = LatentWire(new_cfg, list(model.receivers.values()))
    expected = set(new.trainable_state_dict())
    if set(state) != expected:
        raise ValueError(f"stage hand-off: trainable keys differ (missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]})")
    new.load_state_dict(state, strict=False)
    new.curriculum_state = dict(model.curriculum_state)
    return new


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
