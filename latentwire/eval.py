"""Evaluation: every receiver on every path, on the same held-out examples, plus wire bytes and latency.

Paths (what the frozen receiver reads before generating; `[anchor]` is e.g. "Answer:"):

    text             [BOS][prompt][anchor] as token ids: the full prompt
    latent           [P][BOS?][anchor], P decoded from the real serialized payload at `eval.wire_precision`
    latent_<prec>    the same from the payload at another configured precision (`eval.precisions`)
    token_budget     [BOS][first M prompt tokens][anchor], M = the slots this receiver reads
    byte_budget      [BOS][first N prompt bytes][anchor], N = the length of the example's int8 payload
    embed_raw        the `text` sequence, fed as the receiver's own input embeddings (`inputs_embeds`); must equal
                     `text` exactly, which proves the embedding path is sound before anyone blames the latent
    embed_anchor     [E(prompt)][BOS?][anchor]: prompt embeddings in the latent's place, the latent's suffix
    embed_resampled  prompt embeddings mean-pooled to M slots, then the trained adapter's output stage (slot
                     positions + RMS calibration; its MLP reads d_z, not H), then [BOS?][anchor]

Greedy decoding stops at EOS or `eval.max_new_tokens` only. Gold answers are used for scoring only (EM/F1 with the
official SQuAD normalization, teacher-forced NLL of answer+EOS, first-token top-1/top-5), never as input. Results
are also broken down per dataset (`by_source`). Latency times the prefill and each decode step separately
(synchronized on GPU). Receiver-side features (`latentwire.features`) see the latent on the latent paths only.
`periodic_eval` is what the training loop calls (checkpoints/best is kept by latentwire/checkpoint.py);
`write_outputs` writes metrics.json, predictions.jsonl, report.md and the plots. The full guide is docs/evaluation.md.

Run it from a checkpoint: `python launch/eval.py --checkpoint DIR/checkpoints/latest --output_dir OUT`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import zstandard

import kernels
from latentwire import baselines, metrics
from latentwire.config import EVAL_METRIC_KEYS, parse_metric_name
from latentwire.data import PROMPT_TEMPLATE, DataStats, Example, _pad, prompt_parts, prompt_text
from latentwire.encoder import bytes_to_tensor
from latentwire.features import latent_context
from latentwire.model import LatentWire
from latentwire.distributed import gathered
from latentwire.receivers import Receiver

REPLAY_PATHS = ("embed_raw", "embed_anchor", "embed_resampled")
BUDGET_PATHS = ("token_budget", "byte_budget", "closed_book")  # text-side baselines (latentwire/baselines.py)


def eval_paths(ev) -> list[str]:
    """The paths a full evaluation runs, in report order."""
    others = [p for p in ev.precisions if p != ev.wire_precision]
    paths = ["text", "latent"] + [f"latent_{p}" for p in others]
    paths += ["token_budget", "byte_budget"] + [f"byte_budget_{p}" for p in others] + ["closed_book"]
    if ev.embed_replay:
        paths += list(REPLAY_PATHS)
    return list(dict.fromkeys(paths))


def path_precision(path: str, ev) -> str | None:
    """The wire precision a latent path decodes from (None for the text-side paths)."""
    if path == "latent":
        return ev.wire_precision
    if path.startswith("latent_"):
        return path[len("latent_"):]
    return None


def budget_precision(path: str, ev) -> str | None:
    """The wire precision whose payload bytes a byte-budget path may spend (None for other paths)."""
    if path == "byte_budget":
        return ev.wire_precision
    if path.startswith("byte_budget_"):
        return path[len("byte_budget_"):]
    return None


def is_text_side(path: str) -> bool:
    """Paths that feed the receiver token ids of a text it reads (recorded in predictions.jsonl `inputs`)."""
    return path == "text" or path in BUDGET_PATHS or path.startswith("byte_budget_")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (L_i, H) -> left-padded (B, L, H) with zeros and mask (B, L)."""
    length = max(s.shape[0] for s in seqs)
    out = seqs[0].new_zeros(len(seqs), length, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), length, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        out[i, length - s.shape[0]:] = s
        mask[i, length - s.shape[0]:] = 1
    return out, mask


# ----------------------------------------------------------------------------------------------------------------
# what each path feeds the receiver


def latent_inputs(model: LatentWire, name: str, z: torch.Tensor,
                  between: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, M_total, d_z) decoded from the wire -> inputs_embeds (B, L, H) = [P][BOS?][anchor] and mask (B, L).

    `between` (one string per row) puts text between the BOS and the anchor (the inference API's optional
    question); rows are then left-padded to one length.
    """
    receiver = model.receivers[name]
    contract = receiver.contract
    prefix = model.prefix(z, name).to(receiver.dtype)
    if between is None:
        tail = torch.tensor(contract.latent_prefix_ids(), device=prefix.device).expand(z.shape[0], -1)
        embeds = torch.cat([prefix, receiver.embed(tail)], dim=1)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=prefix.device)
    bos = [contract.bos_id] if contract.latent_bos else []
    rows = [bos + contract.encode(text) + contract.anchor_ids for text in between]
    seqs = [torch.cat([prefix[i], receiver.embed(torch.tensor(row, device=prefix.device))], dim=0)
            for i, row in enumerate(rows)]
    return _left_pad(seqs)


def resampled_inputs(model: LatentWire, name: str, prompt_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt token embeddings (T_i, H) mean-pooled to the adapter's M slots, + slot positions, RMS-calibrated
    like the adapter's output, then [BOS?][anchor] -> (B, M + tail, H), mask."""
    receiver = model.receivers[name]
    adapter = model.adapters[name]
    device = receiver.device
    pooled = []
    for row in prompt_rows:
        emb = receiver.embed(torch.tensor(row, device=device)).float()  # (T, H)
        pooled.append(F.adaptive_avg_pool1d(emb.T.unsqueeze(0), adapter.n_slots)[0].T)  # (M, H)
    with gathered([adapter.slot_pos]):
        prefix = torch.stack(pooled) + adapter.slot_pos.detach().float().to(device)
    if adapter.cfg.calibrate:
        prefix = kernels.rms_calibrate(prefix, float(adapter.target_rms))
    tail = torch.tensor(receiver.contract.latent_prefix_ids(), device=device).expand(len(prompt_rows), -1)
    embeds = torch.cat([prefix.to(receiver.dtype), receiver.embed(tail)], dim=1)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device)


def text_side_prompt(model: LatentWire, name: str, path: str, ex: Example, payload_bytes: dict) -> tuple[str, bool]:
    """(the text receiver `name` reads on text-side `path` for example `ex`, whether the budget was overrun)."""
    cfg = model.cfg
    context, question = prompt_parts(ex, cfg.data.max_prompt_bytes)
    if path == "text":
        return PROMPT_TEMPLATE.format(context=context, question=question), False
    if path == "closed_book":
        return baselines.closed_book_prompt(question), False
    if path == "token_budget":
        m_read = cfg.encoder.m_shared + cfg.encoder.m_private  # the slots this receiver reads
        return baselines.token_budget_prompt(context, question, model.receivers[name].contract.encode, m_read)
    precision = budget_precision(path, cfg.eval)
    if precision is None:
        raise ValueError(f"unknown evaluation path {path!r}")
    return baselines.byte_budget_prompt(context, question, payload_bytes[precision])


def path_inputs(model: LatentWire, name: str, path: str, examples: list[Example], latents: dict,
                payload_lens: dict) -> dict:
    """What receiver `name` reads on `path` for a batch: {"embeds" (B, L, H), "mask" (B, L), "ids" (B, L) or
    None, "bytes": what each row transmits, "texts": the text each row read (text-side paths) or None,
    "overruns": rows whose budget could not hold the question}.

    `latents` maps precision -> decoded z (B, M_total, d_z); `payload_lens` precision -> payload bytes per row.
    Rows are left-padded. Token-id paths also return their ids, so generation runs from ids exactly as a plain
    text prompt would."""
    cfg = model.cfg
    receiver = model.receivers[name]
    contract, device = receiver.contract, receiver.device
    prompts = [prompt_text(ex, cfg.data.max_prompt_bytes) for ex in examples]
    utf8 = [len(p.encode("utf-8")) for p in prompts]
    out = {"ids": None, "bytes": utf8, "texts": None, "overruns": 0}
    precision = path_precision(path, cfg.eval)
    if precision is not None:
        out["embeds"], out["mask"] = latent_inputs(model, name, latents[precision])
        out["bytes"] = list(payload_lens[precision])
        return out
    if path == "embed_resampled":
        out["embeds"], out["mask"] = resampled_inputs(model, name, [contract.encode(p) for p in prompts])
        return out
    if path in ("embed_anchor", "embed_raw"):
        rows = ([contract.encode(p) + contract.latent_prefix_ids() for p in prompts] if path == "embed_anchor"
                else [contract.text_prefix_ids(p) for p in prompts])
        ids, mask = _pad(rows, contract.pad_id, left=True)
        out["embeds"], out["mask"] = receiver.embed(ids.to(device)), mask.to(device)
        return out
    fitted = [text_side_prompt(model, name, path, ex, {p: lens[i] for p, lens in payload_lens.items()})
              for i, ex in enumerate(examples)]
    out["texts"] = [text for text, _ in fitted]
    out["overruns"] = sum(over for _, over in fitted)
    out["bytes"] = [len(text.encode("utf-8")) for text in out["texts"]]
    ids, mask = _pad([contract.text_prefix_ids(t) for t in out["texts"]], contract.pad_id, left=True)
    out["ids"], out["mask"] = ids.to(device), mask.to(device)
    out["embeds"] = receiver.embed(out["ids"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# scoring and timing


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


@torch.no_grad()
def time_prefill_decode(receiver: Receiver, embeds: torch.Tensor, mask: torch.Tensor,
                        steps: int) -> tuple[float, float]:
    """Milliseconds of one prefill over embeds (B, L, H) and the mean of `steps` greedy decode steps with the KV
    cache. Always exactly `steps` steps (no early EOS), so every ZeRO-3 rank runs the same forwards."""
    model = receiver.model
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    _sync()
    start = time.perf_counter()
    out = model(inputs_embeds=embeds.to(receiver.dtype), attention_mask=mask, position_ids=position_ids,
                use_cache=True, **keep)
    next_token = out.logits[:, -1].argmax(-1)
    _sync()
    prefill_ms = (time.perf_counter() - start) * 1000.0
    cache, position = out.past_key_values, position_ids[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        out = model(inputs_embeds=receiver.embed(next_token[:, None]), attention_mask=mask, position_ids=position,
                    past_key_values=cache, use_cache=True)
        cache, next_token = out.past_key_values, out.logits[:, -1].argmax(-1)
    _sync()
    return prefill_ms, (time.perf_counter() - start) * 1000.0 / max(1, steps)


def _median_p90(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def _summary(rec: dict, rows: list[int]) -> dict:
    pick = {k: [v[i] for i in rows] for k, v in rec.items()}
    return {"em": 100.0 * statistics.fmean(pick["em"]), "f1": 100.0 * statistics.fmean(pick["f1"]),
            "nll": statistics.fmean(pick["nll"]), "first_tok_top1": 100.0 * statistics.fmean(pick["top1"]),
            "first_tok_top5": 100.0 * statistics.fmean(pick["top5"]), "bytes": statistics.fmean(pick["bytes"]),
            "n": len(rows)}


# ----------------------------------------------------------------------------------------------------------------
# the evaluation: one batch of examples through every path, then the summary


@dataclass
class Tally:
    """Per-example records an evaluation accumulates, batch by batch (lists in example order)."""

    paths: list[str]
    names: list[str]
    precisions: list[str]
    recs: dict = field(default_factory=dict)  # receiver -> path -> field -> [value per example]
    latency: dict = field(default_factory=dict)  # receiver -> path -> {"prefill_ms": [...], "decode_ms_per_token"}
    overruns: dict = field(default_factory=dict)  # receiver -> budget path -> rows whose question overran the budget
    prompt_tokens: dict = field(default_factory=dict)  # receiver -> [tokens per prompt]
    payload_bytes: dict = field(default_factory=dict)  # precision -> [bytes per example]
    text_utf8: list = field(default_factory=list)
    text_zstd: list = field(default_factory=list)
    zstd_dict: object = None  # zstandard.ZstdCompressor with a dictionary trained on TRAINING prompts, or None
    zstd_dict_bytes: bytes = b""
    text_zstd_dict: list = field(default_factory=list)

    def __post_init__(self):
        fields_ = ("em", "f1", "nll", "top1", "top5", "bytes")
        self.recs = {n: {p: {f: [] for f in fields_} for p in self.paths} for n in self.names}
        self.latency = {n: {p: {"prefill_ms": [], "decode_ms_per_token": []} for p in self.paths} for n in self.names}
        self.overruns = {n: {} for n in self.names}
        self.prompt_tokens = {n: [] for n in self.names}
        self.payload_bytes = {p: [] for p in self.precisions}


def _wire_precisions(ev, paths: list[str]) -> tuple[list[str], list[str]]:
    """(precisions whose payloads are built: the reported ones plus those a path needs, the ones decoded)."""
    decoded = [path_precision(p, ev) for p in paths if path_precision(p, ev)]
    spent = [budget_precision(p, ev) for p in paths if budget_precision(p, ev)]
    return list(dict.fromkeys(list(ev.precisions) + decoded + spent)), list(dict.fromkeys(decoded))


@torch.no_grad()
def evaluate_batch(model: LatentWire, examples: list[Example], rows: list[dict], tally: Tally, synced: bool,
                   latency: bool) -> None:
    """Encode one batch of prompts, send it through the real wire at every precision, and run every receiver on
    every path of `tally`: greedy generation, teacher-forced scoring of the gold answer, optional timing.
    Appends to `tally` and fills each row's "predictions" and "inputs" (the text each text-side path read)."""
    cfg, ev = model.cfg, model.cfg.eval
    device = next(model.encoder.parameters()).device
    prompts = [prompt_text(ex, cfg.data.max_prompt_bytes) for ex in examples]
    golds = [ex.answers for ex in examples]
    encoded = [p.encode("utf-8") for p in prompts]
    zstd = zstandard.ZstdCompressor(level=19)
    tally.text_utf8 += [len(b) for b in encoded]
    tally.text_zstd += [len(zstd.compress(b)) for b in encoded]  # each prompt alone, as it would be sent
    if tally.zstd_dict is not None:
        tally.text_zstd_dict += [len(tally.zstd_dict.compress(b)) for b in encoded]
    byte_ids, byte_mask = bytes_to_tensor(encoded, cfg.data.max_prompt_bytes)
    z, codes = model.encoder(byte_ids.to(device), byte_mask.to(device), with_codes=True)
    # The latent paths read what crossed the wire, not the encoder's in-memory tensor.
    built, decoded = _wire_precisions(ev, tally.paths)
    payloads = {p: model.to_wire(z, codes, p, ev.group_size) for p in built}
    payload_lens = {p: [len(b) for b in payloads[p]] for p in built}
    for p in tally.precisions:
        tally.payload_bytes[p] += payload_lens[p]
    latents = {p: model.from_wire(payloads[p]) for p in decoded}
    for name, receiver in model.receivers.items():
        tally.prompt_tokens[name] += [len(receiver.contract.encode(p)) for p in prompts]
        for path in tally.paths:
            inp = path_inputs(model, name, path, examples, latents, payload_lens)
            embeds, mask = inp["embeds"], inp["mask"]
            gen_kwargs = {"input_ids": inp["ids"]} if inp["ids"] is not None else {"inputs_embeds": embeds}
            precision = path_precision(path, ev)
            # Receiver-side features (LoRA, KV prefixes, latent adapters) see the latent on latent paths only.
            with latent_context(model, name, latents[precision]) if precision else contextlib.nullcontext():
                tokens = receiver.generate(mask, ev.max_new_tokens, synced=synced, **gen_kwargs)
                if latency:
                    for _ in range(ev.latency_repeats):
                        prefill, decode = time_prefill_decode(receiver, embeds, mask, ev.max_new_tokens)
                        tally.latency[name][path]["prefill_ms"].append(prefill)
                        tally.latency[name][path]["decode_ms_per_token"].append(decode)
                nll, _, top1, top5 = score_answers(receiver, model.heads[name], embeds, mask, [g[0] for g in golds])
            if inp["texts"] is not None:
                tally.overruns[name][path] = tally.overruns[name].get(path, 0) + inp["overruns"]
            rec = tally.recs[name][path]
            for i, (row, t, gold) in enumerate(zip(rows, tokens, golds)):
                pred = receiver.decode(t)
                row["predictions"].setdefault(name, {})[path] = pred
                if inp["texts"] is not None:
                    row.setdefault("inputs", {}).setdefault(name, {})[path] = inp["texts"][i]
                rec["em"].append(metrics.exact_match(pred, gold))
                rec["f1"].append(metrics.f1_score(pred, gold))
            rec["nll"] += nll
            rec["top1"] += [float(x) for x in top1]
            rec["top5"] += [float(x) for x in top5]
            rec["bytes"] += [float(b) for b in inp["bytes"]]


ZSTD_DICT_SIZE = 16384  # bytes of the trained dictionary (shared state, like the quantizer's levels)
ZSTD_DICT_SAMPLES = 4000  # training prompts it is trained on


def zstd_dictionary(train_examples: list[Example], max_prompt_bytes: int) -> bytes:
    """A zstd dictionary trained on (up to ZSTD_DICT_SAMPLES of) the TRAINING prompts, deterministically."""
    step = max(1, len(train_examples) // ZSTD_DICT_SAMPLES)
    samples = [prompt_text(ex, max_prompt_bytes).encode("utf-8") for ex in train_examples[::step]]
    size = min(ZSTD_DICT_SIZE, max(256, sum(map(len, samples)) // 10))
    return zstandard.train_dictionary(size, samples, level=19).as_bytes()


def compression(tally: Tally, m_read: int, n_slots: int) -> dict:
    """Per receiver, what the latent saves, each ratio with its denominator named:
    tokens_read = mean prompt tokens / slots that receiver reads; tokens_sent = mean prompt tokens / all slots on
    the wire (shared + every receiver's private); bytes_utf8 / bytes_zstd = mean prompt bytes (UTF-8, or each
    prompt zstd-19 alone) / mean payload bytes, header included, per wire precision."""
    utf8, zstd = statistics.fmean(tally.text_utf8), statistics.fmean(tally.text_zstd)
    payload = {p: statistics.fmean(v) for p, v in tally.payload_bytes.items()}
    out = {}
    for name, tokens in tally.prompt_tokens.items():
        mean_tokens = statistics.fmean(tokens)
        out[name] = {"tokens_read": mean_tokens / m_read, "tokens_sent": mean_tokens / n_slots,
                     "bytes_utf8": {p: utf8 / b for p, b in payload.items()},
                     "bytes_zstd": {p: zstd / b for p, b in payload.items()}}
        if tally.text_zstd_dict:
            zstd_dict = statistics.fmean(tally.text_zstd_dict)
            out[name]["bytes_zstd_dict"] = {p: zstd_dict / b for p, b in payload.items()}
    return out


def summarise(model: LatentWire, tally: Tally, examples: list[Example], stats: dict, features: list[str] | None,
              latency: bool) -> dict:
    """The metrics dict in the contract layout: per receiver and path (with a per-dataset breakdown), the wire,
    latency, and what was evaluated."""
    cfg, ev = model.cfg, model.cfg.eval
    by_source = {src: [i for i, ex in enumerate(examples) if ex.source == src] for src in stats}
    everyone = list(range(len(examples)))
    result: dict = {}
    for name in model.names:
        result[name] = {}
        for path in tally.paths:
            entry = _summary(tally.recs[name][path], everyone)
            entry["by_source"] = {src: _summary(tally.recs[name][path], idx) for src, idx in by_source.items()}
            if path in tally.overruns[name]:  # budget rows whose question alone did not fit (kept whole)
                entry["budget_overruns"] = tally.overruns[name][path]
            result[name][path] = entry
    n_slots = model.encoder.n_slots
    m_read = cfg.encoder.m_shared + cfg.encoder.m_private
    result["wire"] = {
        "latent_slots": n_slots,  # everything on the wire: shared + every receiver's private slots
        "latent_dim": cfg.encoder.d_z,
        "latent_bytes": {p: statistics.fmean(v) for p, v in tally.payload_bytes.items()},
        "latent_bytes_ideal": {p: model.payload_bits_ideal(p) / 8 for p in ev.precisions},
        "group_size": ev.group_size,
        "text_bytes_utf8": statistics.fmean(tally.text_utf8),
        "text_bytes_zstd": statistics.fmean(tally.text_zstd),
        # zstd-19 with a dictionary trained on the training prompts: the dictionary is shared state, like the
        # quantizer's levels, and is not counted per example
        "text_bytes_zstd_dict": statistics.fmean(tally.text_zstd_dict) if tally.text_zstd_dict else None,
        "zstd_dict_bytes": len(tally.zstd_dict_bytes) if tally.zstd_dict_bytes else None,
        "token_compression": {n: statistics.fmean(tally.prompt_tokens[n]) / m_read for n in model.names},
        "slots_per_receiver": m_read,
        "compression": compression(tally, m_read, n_slots),
    }
    result["latency"] = ({n: {p: {k: _median_p90(v) for k, v in tally.latency[n][p].items()} for p in tally.paths}
                          for n in model.names} if latency else {})
    result["device"] = next(model.encoder.parameters()).device.type  # "cuda" when evaluated on a GPU
    result["features"] = list(features or [])
    result["wire_precision"] = ev.wire_precision
    result["n_examples"] = len(examples)
    result["receivers"] = list(model.names)
    result["paths"] = tally.paths
    result["data"] = {"sources": {s: len(idx) for s, idx in by_source.items()},
                      "prompts_truncated": {s: st.prompts_truncated for s, st in stats.items()},
                      "invalid_utf8": {s: st.invalid_utf8 for s, st in stats.items()},
                      "max_prompt_bytes": cfg.data.max_prompt_bytes}
    return result


@torch.no_grad()
def evaluate(model: LatentWire, examples: list[Example], synced: bool = False, features: list[str] | None = None,
             paths: list[str] | None = None, max_examples: int | None = None, latency: bool = True,
             split: str = "test", train_examples: list[Example] | None = None):
    """Evaluate every receiver on `paths` (default: `eval_paths(cfg.eval)`) over `examples`, which are the split
    named `split` ("test" or "validation", recorded in the result). Returns (metrics dict in the contract layout,
    one predictions row per example). `train_examples` (the TRAINING split) train the zstd dictionary the
    strongest text baseline compresses with (`wire.text_bytes_zstd_dict`).

    Every rank must call this with the same arguments when the receivers are ZeRO-3 partitioned (`synced`).
    """
    cfg, ev = model.cfg, model.cfg.eval
    paths = list(dict.fromkeys(paths or eval_paths(ev)))
    limit = ev.max_examples if max_examples is None else max_examples
    examples = examples[:limit] if limit else list(examples)
    if not examples:
        raise ValueError("evaluation needs at least one example (eval.max_examples and the eval split are empty)")
    was_training = model.training
    model.eval()
    tally = Tally(paths, list(model.names), list(ev.precisions))
    if train_examples:
        tally.zstd_dict_bytes = zstd_dictionary(train_examples, cfg.data.max_prompt_bytes)
        # The receiving side holds the dictionary, so the frame needs neither its id nor the content size: the
        # strongest fair form of this baseline.
        dictionary = zstandard.ZstdCompressionDict(tally.zstd_dict_bytes)
        tally.zstd_dict = zstandard.ZstdCompressor(level=19, dict_data=dictionary, write_dict_id=False,
                                                   write_content_size=False)
    stats = {src: DataStats() for src in dict.fromkeys(ex.source for ex in examples)}
    rows = [{"id": ex.id, "source": ex.source, "answers": ex.answers, "predictions": {}} for ex in examples]
    for ex in examples:  # count truncations once per example
        prompt_text(ex, cfg.data.max_prompt_bytes, stats[ex.source])
    for start in range(0, len(examples), ev.batch_size):
        chunk = examples[start:start + ev.batch_size]
        evaluate_batch(model, chunk, rows[start:start + len(chunk)], tally, synced, latency)
    result = {"split": split, **summarise(model, tally, examples, stats, features, latency)}
    model.train(was_training)
    return result, rows


# ----------------------------------------------------------------------------------------------------------------
# periodic evaluation during training (checkpoints/best: latentwire/checkpoint.py)


def metric_value(result: dict, metric: str) -> float:
    """The value of a metric name such as 'latent_f1_mean' (see `config.parse_metric_name`) in an eval result."""
    path, key, who = parse_metric_name(metric, result["receivers"])
    names = result["receivers"] if who == "mean" else [who]
    values = []
    for name in names:
        entry = result[name].get(path)
        if entry is None and path == f"latent_{result['wire_precision']}":
            entry = result[name]["latent"]
        if entry is None:
            raise KeyError(f"metric {metric!r}: path {path!r} was not evaluated (paths: {result['paths']})")
        values.append(entry[key])
    return statistics.fmean(values)


@torch.no_grad()
def periodic_eval(model: LatentWire, examples: list[Example], step: int, synced: bool = False) -> dict:
    """A quick evaluation on the VALIDATION split during training: `eval.periodic_examples` examples, the `latent`
    path plus the path `eval.best_metric` names, no latency. Every rank must call it with the same arguments.

    Returns {"step", "metric", "value", "log": {"eval/<path>_<key>/<receiver>": v, "eval/<metric>": value}}.
    """
    ev = model.cfg.eval
    path, _, _ = parse_metric_name(ev.best_metric, model.names)
    if path == f"latent_{ev.wire_precision}":
        path = "latent"
    paths = list(dict.fromkeys(["latent", path]))
    result, _ = evaluate(model, examples, synced=synced, paths=paths,
                         max_examples=ev.periodic_examples or ev.max_examples, latency=False, split="validation")
    value = metric_value(result, ev.best_metric)
    log = {f"eval/{p}_{k}/{n}": result[n][p][k] for n in model.names for p in paths for k in EVAL_METRIC_KEYS}
    log[f"eval/{ev.best_metric}"] = value
    return {"step": step, "metric": ev.best_metric, "value": value, "log": log}


# ----------------------------------------------------------------------------------------------------------------
# outputs


def format_table(result: dict) -> str:
    """Markdown table: receiver x path with EM / F1 / first-token / NLL / bytes, then the wire line."""
    from latentwire.report import results_table, wire_line

    return results_table(result) + "\n\n" + wire_line(result)


def write_outputs(result: dict, rows: list[dict], out_dir: str | Path, metrics_jsonl: str | Path | None = None,
                  plots: bool = True) -> Path:
    """Write metrics.json, predictions.jsonl, report.md and the PNG plots into out_dir (rank 0 only)."""
    from latentwire.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    write_report(result, out, metrics_jsonl, plots=plots)
    return out
