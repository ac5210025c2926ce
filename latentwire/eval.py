"""Evaluation: per receiver, the `text`, `latent` and `token_budget` paths on the same held-out examples.

    text          the frozen receiver reads [BOS][prompt][anchor]
    latent        it reads [P][BOS?][anchor], P decoded from the real serialized wire payload
    token_budget  it reads the prompt cut to as many tokens as it gets latent slots

Greedy decoding stops at EOS or `eval.max_new_tokens` only; gold answers are used for scoring (EM/F1 with the
official SQuAD normalization, teacher-forced NLL, first-token top-1/top-5), never as input. Also reported: real
wire bytes per precision against the prompt's UTF-8 and zstd bytes, and prefill / per-token decode latency.
Run it from a checkpoint with `python launch/eval.py --checkpoint DIR/checkpoints/latest --output_dir OUT`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import zstandard

from latentwire import metrics, wire
from latentwire.data import Example, _pad, prompt_text
from latentwire.encoder import bytes_to_tensor
from latentwire.model import LatentWire
from latentwire.receivers import Receiver

PATHS = ("text", "latent", "token_budget")
RESERVED_KEYS = ("wire", "latency", "features", "n_examples", "receivers", "wire_precision")


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _left_padded_embeds(receiver: Receiver, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = _pad(rows, receiver.contract.pad_id, left=True)
    ids, mask = ids.to(receiver.device), mask.to(receiver.device)
    return receiver.embed(ids), mask


@torch.no_grad()
def score_answers(receiver: Receiver, head, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor,
                  answers: list[str]) -> tuple[list[float], list[int], list[bool], list[bool]]:
    """Teacher-forced scoring of gold answer+EOS after a left-padded prefix (B, Lp, H).

    Returns per-example mean NLL per token, the number of scored tokens, and whether the gold first answer
    token is the top-1 / within the top-5 prediction at the first answer position.
    """
    contract = receiver.contract
    answer_rows = [contract.answer_ids(a) for a in answers]
    ans_ids, ans_mask = _pad(answer_rows, contract.pad_id)
    ans_ids, ans_mask = ans_ids.to(prefix_embeds.device), ans_mask.to(prefix_embeds.device)
    embeds = torch.cat([prefix_embeds.to(receiver.dtype), receiver.embed(ans_ids[:, :-1])], dim=1)
    mask = torch.cat([prefix_mask, ans_mask[:, :-1]], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = receiver.model.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                       use_cache=False)
    hidden = out.last_hidden_state[:, prefix_embeds.shape[1] - 1:]  # positions predicting answer tokens
    logits = head(hidden)["logits"]
    logp = torch.log_softmax(logits, dim=-1)
    token_nll = -logp.gather(-1, ans_ids.unsqueeze(-1)).squeeze(-1) * ans_mask
    n_tokens = ans_mask.sum(1)
    nll = (token_nll.sum(1) / n_tokens.clamp(min=1)).tolist()
    top5 = logits[:, 0].topk(min(5, logits.shape[-1]), dim=-1).indices
    first = ans_ids[:, 0]
    top1_hit = (top5[:, 0] == first).tolist()
    top5_hit = (top5 == first.unsqueeze(1)).any(1).tolist()
    return nll, n_tokens.tolist(), top1_hit, top5_hit


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) * 1000.0


@torch.no_grad()
def evaluate(model: LatentWire, examples: list[Example], synced: bool = False, features: list[str] | None = None):
    """Evaluate every receiver on every path. Returns (metrics dict in the contract layout, predictions rows).

    Every rank must call this with the same examples when the receivers are ZeRO-3 partitioned (`synced`).
    """
    cfg = model.cfg
    ev = cfg.eval
    was_training = model.training
    model.eval()
    examples = examples[: ev.max_examples] if ev.max_examples else examples
    if not examples:
        raise ValueError("evaluation needs at least one example (eval.max_examples and the eval split are empty)")
    device = next(model.encoder.parameters()).device
    m_read = cfg.encoder.m_shared + cfg.encoder.m_private
    sums = {n: {p: {"em": [], "f1": [], "nll": [], "top1": [], "top5": []} for p in PATHS} for n in model.names}
    lat = {n: {p: {"prefill_ms": [], "decode_ms_per_token": []} for p in PATHS} for n in model.names}
    prompt_tokens = {n: [] for n in model.names}
    payload_bytes = {p: [] for p in ev.precisions}
    text_utf8, text_zstd = [], []
    zstd = zstandard.ZstdCompressor(level=19)
    rows = [{"id": ex.id, "answers": ex.answers, "predictions": {}} for ex in examples]

    for start, chunk in zip(range(0, len(examples), ev.batch_size), _batches(examples, ev.batch_size)):
        prompts = [prompt_text(ex, cfg.data.max_prompt_bytes) for ex in chunk]
        encoded = [p.encode("utf-8") for p in prompts]
        text_utf8 += [len(b) for b in encoded]
        text_zstd += [len(zstd.compress(b)) for b in encoded]
        byte_ids, byte_mask = bytes_to_tensor(encoded, cfg.data.max_prompt_bytes)
        z = model.encode(byte_ids.to(device), byte_mask.to(device)).float().cpu()
        for precision in ev.precisions:
            payload_bytes[precision] += [len(p) for p in wire.encode_batch(z, precision, ev.group_size)]
        # The latent path reads what crossed the wire, not the encoder's in-memory tensor.
        z_wire = wire.decode_batch(wire.encode_batch(z, ev.wire_precision, ev.group_size)).to(device)
        golds = [ex.answers for ex in chunk]
        for name, receiver in model.receivers.items():
            contract = receiver.contract
            prompt_tokens[name] += [len(contract.encode(p)) for p in prompts]
            prefixes = {}
            p = model.prefix(z_wire, name)
            tail = torch.tensor(contract.latent_prefix_ids(), device=device).expand(len(chunk), -1)
            latent_embeds = torch.cat([p.to(receiver.dtype), receiver.embed(tail)], dim=1)
            prefixes["latent"] = (latent_embeds, torch.ones(latent_embeds.shape[:2], dtype=torch.long, device=device),
                                  None)
            for path, cap in (("text", None), ("token_budget", m_read)):
                ids_rows = [contract.text_prefix_ids(pr, max_prompt_tokens=cap) for pr in prompts]
                ids, mask = _pad(ids_rows, contract.pad_id, left=True)
                prefixes[path] = (receiver.embed(ids.to(device)), mask.to(device), ids.to(device))
            for path in PATHS:
                embeds, mask, ids = prefixes[path]
                gen_kwargs = {"input_ids": ids} if ids is not None else {"inputs_embeds": embeds}
                _, prefill_ms = _timed(lambda: receiver.model.get_decoder()(
                    inputs_embeds=embeds.to(receiver.dtype), attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True))
                tokens, gen_ms = _timed(lambda: receiver.generate(mask, ev.max_new_tokens, synced=synced,
                                                                  **gen_kwargs))
                preds = [receiver.decode(t) for t in tokens]
                steps = max(1, max(len(t) for t in tokens) + 1)
                lat[name][path]["prefill_ms"].append(prefill_ms)
                lat[name][path]["decode_ms_per_token"].append(max(0.0, gen_ms - prefill_ms) / steps)
                nll, _, top1, top5 = score_answers(receiver, model.heads[name], embeds, mask, [g[0] for g in golds])
                s = sums[name][path]
                for i, (pred, gold) in enumerate(zip(preds, golds)):
                    s["em"].append(metrics.exact_match(pred, gold))
                    s["f1"].append(metrics.f1_score(pred, gold))
                    rows[start + i]["predictions"].setdefault(name, {})[path] = pred
                s["nll"] += nll
                s["top1"] += [float(x) for x in top1]
                s["top5"] += [float(x) for x in top5]

    result: dict = {}
    for name in model.names:
        result[name] = {}
        for path in PATHS:
            s = sums[name][path]
            entry = {"em": 100.0 * statistics.fmean(s["em"]), "f1": 100.0 * statistics.fmean(s["f1"]),
                     "nll": statistics.fmean(s["nll"]), "first_tok_top1": 100.0 * statistics.fmean(s["top1"]),
                     "first_tok_top5": 100.0 * statistics.fmean(s["top5"]), "n": len(s["em"])}
            result[name][path] = entry
    n_slots = model.encoder.n_slots
    result["wire"] = {
        "latent_slots": n_slots,
        "latent_dim": cfg.encoder.d_z,
        "latent_bytes": {p: statistics.fmean(v) for p, v in payload_bytes.items()},
        "text_bytes_utf8": statistics.fmean(text_utf8),
        "text_bytes_zstd": statistics.fmean(text_zstd),
        "token_compression": {n: statistics.fmean(prompt_tokens[n]) / m_read for n in model.names},
        "slots_per_receiver": m_read,
    }
    result["latency"] = {n: {p: {k: _median_p90(v) for k, v in lat[n][p].items()} for p in PATHS}
                         for n in model.names}
    result["features"] = list(features or [])
    result["wire_precision"] = ev.wire_precision
    result["n_examples"] = len(examples)
    result["receivers"] = list(model.names)
    model.train(was_training)
    return result, rows


def _median_p90(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def format_table(result: dict) -> str:
    """Markdown table: receiver x path with EM / F1 / first-token / NLL, then the wire bytes."""
    lines = ["| receiver | path | EM | F1 | FirstTok@1 | FirstTok@5 | NLL |", "|---|---|---|---|---|---|---|"]
    for name in result["receivers"]:
        for path in PATHS:
            e = result[name][path]
            lines.append(f"| {name} | {path} | {e['em']:.2f} | {e['f1']:.2f} | {e['first_tok_top1']:.1f} | "
                         f"{e['first_tok_top5']:.1f} | {e['nll']:.3f} |")
    w = result["wire"]
    sizes = ", ".join(f"{p} {b:.0f} B" for p, b in w["latent_bytes"].items())
    comp = ", ".join(f"{n} {c:.1f}x" for n, c in w["token_compression"].items())
    lines.append("")
    lines.append(f"wire: {w['latent_slots']} slots x {w['latent_dim']} dims -> {sizes}; text {w['text_bytes_utf8']:.0f} B "
                 f"UTF-8, {w['text_bytes_zstd']:.0f} B zstd; token compression {comp} ({result['n_examples']} examples)")
    return "\n".join(lines)


def load_checkpoint_model(checkpoint: str | Path, overrides: list[str] | None = None):
    """Rebuild config, receivers and trainable weights from a checkpoint directory alone -> (cfg, model)."""
    import json as _json

    from safetensors.torch import load_file

    from latentwire import config as config_lib
    from latentwire.train import TRAINABLE_FILE, verify_checkpoint

    path = Path(checkpoint).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    verify_checkpoint(path)
    cfg = config_lib.load_config(path / "config.json", overrides)
    receivers = [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]
    saved_contracts = _json.loads((path / "contract.json").read_text())
    for r in receivers:
        now = r.contract.to_dict()
        if saved_contracts.get(r.cfg.name) != now:
            raise ValueError(f"receiver {r.cfg.name!r}: the prefix contract saved in {path} differs from the one "
                             f"rebuilt from {r.cfg.path!r} (different tokenizer or anchor)")
    torch.manual_seed(cfg.train.seed)
    model = LatentWire(cfg, receivers)
    state = load_file(str(path / TRAINABLE_FILE))
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        raise ValueError(f"{path / TRAINABLE_FILE}: keys differ from the model's trainable state "
                         f"(missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})")
    model.load_state_dict(state, strict=False)
    model.eval()
    return cfg, model
