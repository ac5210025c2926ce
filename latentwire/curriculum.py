"""Curriculum: pure functions of the global step (and of all-reduced metrics), so every rank computes the same.

    keep_probability    shared-slot keep probability, linear from latent_keep_start to latent_keep_end
    k_at                adaptive K: supervised answer tokens, ramped by step or advanced by first-token accuracy
    first_token_weight  extra CE weight on answer token 0, linear from start to end
    text_blend          text/latent warm-up: share of pooled text embeddings mixed into the latent prefix
    data_stage_after    curriculum.data_stages: easier training data first, each stage left on its own validation
                        metric (or a step cap), then the run's own data (the trainer swaps the splits)
    stage_at / stage_config / handoff_state
                        staged latent length (e.g. M = 64 -> 48 -> 32) and the weight hand-off between stages
                        (the trainer builds the next stage's model: latentwire/train.py `hand_off`)
    on_batch_start / after_step / warmup_prefix
                        where the model and the trainer apply the curriculum (batch targets, adaptive-K state,
                        the warm-up blend of the latent prefix)

Stage hand-off rule: the pooler queries and the adapters' slot positions of the SHARED slots are resampled to the
new M by linear interpolation along the slot axis (align_corners, so the first and last slot keep their vectors);
private slots and every other weight are carried over unchanged; the optimizer starts fresh.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from latentwire.config import Config, ConfigError, parse_metric_name


def _linear(start: float, end: float, ramp: int, step: int) -> float:
    if ramp <= 0:
        return end
    t = min(1.0, step / ramp)
    return start + t * (end - start)


def data_stage_after(cfg: Config, stage: int, stage_start: int, step: int, value: float | None = None) -> int:
    """The data stage to train on after optimizer step `step` (1-based count of steps done), given the current
    `stage` (index into curriculum.data_stages; len(data_stages) = the run's own data), the step it began at and
    `value`, this step's periodic VALIDATION eval.best_metric on the stage's validation set (None when no
    evaluation ran). A stage ends when `value` reaches its advance_at (at or below it for an NLL metric) or after
    max_steps steps in it; the run's own data never ends."""
    stages = cfg.curriculum.data_stages
    if stage >= len(stages):
        return stage
    spec = stages[stage]
    if spec.max_steps and step - stage_start >= spec.max_steps:
        return stage + 1
    if spec.advance_at and value is not None and value == value:  # NaN never advances
        lower = parse_metric_name(cfg.eval.best_metric, None)[1] == "nll"
        if (value <= spec.advance_at) if lower else (value >= spec.advance_at):
            return stage + 1
    return stage


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


def stage_start(cfg: Config, stage: int) -> int:
    """The optimizer step at which latent-length stage `stage` starts (its LR schedule counts from there)."""
    return ([0] + list(cfg.curriculum.stage_steps))[stage]


def resume_stage(cfg: Config, step: int, m_saved: int, where: str = "checkpoint") -> int:
    """The stage a checkpoint of `step` with encoder.m_shared `m_saved` belongs to. A run stopped right at a
    boundary has not handed off yet (its weights are the previous stage's); the loop does that next."""
    stages = [i for i, m in enumerate(cfg.curriculum.m_stages) if m == m_saved and i <= stage_at(cfg, step)]
    if not stages:
        raise ConfigError(f"{where}: its m_shared {m_saved} is not a stage of curriculum.m_stages "
                         f"{cfg.curriculum.m_stages} at step {step}")
    return stages[-1]


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


def on_batch_start(model, batch: dict, step: int) -> dict:
    """Apply the step's curriculum to a collated batch in place (adaptive K masks targets past K); returns the
    schedule values for metrics.jsonl."""
    cfg = model.cfg
    k = k_at(cfg, step, model.curriculum_state)
    if k < cfg.losses.k_tokens:
        for rb in batch["receivers"].values():
            rb["targets"] = mask_targets(rb["targets"], k)
    values = {"curriculum/k": float(k), "curriculum/keep": keep_probability(cfg, step)}
    if cfg.curriculum.first_tok_weight_start or cfg.curriculum.first_tok_weight_end:
        values["curriculum/first_tok_weight"] = first_token_weight(cfg, step)
    if cfg.curriculum.text_warmup_steps:
        values["curriculum/text_blend"] = text_blend(cfg, step)
    return values


def after_step(model, parts: dict) -> None:
    """After an optimizer step, with the all-reduced metrics of that step (identical on every rank)."""
    if model.cfg.curriculum.k_acc_threshold > 0:
        accs = [v for k, v in parts.items() if k.startswith("first_tok_acc/")]
        if accs:
            model.curriculum_state = advance_k(model.cfg, model.curriculum_state, sum(accs) / len(accs))


def warmup_prefix(model, name: str, prefix: torch.Tensor, rb: dict, step: int) -> torch.Tensor:
    """Text/latent warm-up: blend the prefix P (B, M, H) with the receiver's own prompt embeddings, mean-pooled to M
    slots (tokens before the answer only, so no gold token leaks in), by `text_blend(step)`."""
    blend = text_blend(model.cfg, step)
    if blend <= 0:
        return prefix
    ids, mask = rb["text_ids"], rb["text_mask"]
    before_answer = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < rb["text_answer_start"].unsqueeze(1)
    with torch.no_grad():
        text = model.receivers[name].embed(ids).float()
    pooled = pooled_text_prefix(text, mask.bool() & before_answer, prefix.shape[1])
    return (1.0 - blend) * prefix + blend * pooled.to(prefix.dtype)
