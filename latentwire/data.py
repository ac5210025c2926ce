"""QA data for LatentWire: readers, the prompt format, the article split, data order and collation.

Readers map every source to one `Example(id, source, article, context, question, answers)`:
  - SQuAD v1.1 official JSON (`data[].paragraphs[].qas[]`), or a `datasets` layout (local json/jsonl/parquet
    files or, when online, a hub id such as `rajpurkar/squad`);
  - HotpotQA distractor rows (Hugging Face layout: `context{title[], sentences[[..]]}`) or the original
    list-of-dicts layout (`context: [[title, [sentences]]]`);
  - NQ-open with its gold passage (`{question, answers[], ctxs: [{title, text, ...}]}`, jsonl or jsonl.gz).
With no files configured the embedded SQuAD sample (`latentwire/assets/squad_sample.json`) is used.

The byte encoder reads `prompt_bytes(example)`; each receiver tokenizes the same prompt through its prefix
contract (`latentwire.receivers`). The data order is a pure function of (seed, epoch): step N of any run reads
the same examples whatever the world size, so resumes and rank layouts agree.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from latentwire.encoder import QUESTION_LABEL, bytes_to_tensor

EMBEDDED_SQUAD = Path(__file__).parent / "assets" / "squad_sample.json"
PROMPT_TEMPLATE = "Context: {context}\nQuestion: {question}\n"
CONTEXT_LABEL = b"Context: "  # the bytes of PROMPT_TEMPLATE before the context (QUESTION_LABEL: after it)


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the record."""


@dataclass
class Example:
    id: str
    source: str  # dataset name: squad | hotpot | nq
    article: str  # grouping key of the splits: article title (SQuAD), person (toy), normalised question (HotpotQA, NQ)
    context: str
    question: str
    answers: list[str]  # every gold answer; answers[0] is the training target


@dataclass
class DataStats:
    prompts_truncated: int = 0  # prompts whose context was cut to fit max_prompt_bytes
    invalid_utf8: int = 0  # prompts with undecodable bytes (replaced, not dropped)


# ----------------------------------------------------------------------------------------------------------------
# readers


def _require(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")


def _check_text(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{field}' must be a non-empty string, got {value!r}")
    return value


def read_squad_json(path: Path) -> list[Example]:
    """Official SQuAD v1.1 layout."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise DataError(f"{path}: expected the SQuAD layout {{'data': [{{'title', 'paragraphs': [...]}}]}}")
    examples = []
    for a, article in enumerate(obj["data"]):
        title = article.get("title", f"article{a}")
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            _require(para, ("context", "qas"), where)
            context = _check_text(para["context"], where, "context")
            for q, qa in enumerate(para["qas"]):
                at = f"{where}.qas[{q}]"
                _require(qa, ("id", "question", "answers"), at)
                answers = [ans.get("text", "") for ans in qa["answers"] if isinstance(ans, dict)]
                answers = [x for x in answers if x.strip()]
                if not answers:
                    raise DataError(f"{at} (id {qa['id']}): no answer text")
                examples.append(Example(str(qa["id"]), "squad", title, context,
                                        _check_text(qa["question"], at, "question"), answers))
    return examples


def _squad_row(row: dict, where: str) -> Example:
    _require(row, ("id", "context", "question", "answers"), where)
    answers = row["answers"]
    texts = answers.get("text", []) if isinstance(answers, dict) else [a.get("text", "") for a in answers]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{where} (id {row['id']}): no answer text")
    return Example(str(row["id"]), "squad", str(row.get("title", "")), _check_text(row["context"], where, "context"),
                   _check_text(row["question"], where, "question"), texts)


def _hotpot_row(row: dict, where: str) -> Example:
    key = "id" if "id" in row else "_id"
    _require(row, (key, "question", "answer", "context"), where)
    ctx = row["context"]
    if isinstance(ctx, dict):  # HF layout
        pairs = list(zip(ctx.get("title", []), ctx.get("sentences", [])))
    else:  # original layout: [[title, [sentences]], ...]
        pairs = [(item[0], item[1]) for item in ctx]
    if not pairs:
        raise DataError(f"{where}: empty context")
    context = "\n".join(f"{title}: {''.join(sents)}" for title, sents in pairs)
    question = _check_text(row["question"], where, "question")
    return Example(str(row[key]), "hotpot", normalize_text(question), context, question,
                   [_check_text(row["answer"], where, "answer")])


def _nq_row(row: dict, where: str, index: int) -> Example:
    _require(row, ("question",), where)
    answers = row.get("answers", row.get("answer"))
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{where}: missing answers")
    ctxs = row.get("ctxs") or []
    if not ctxs:
        raise DataError(f"{where}: no passage ('ctxs'); NQ-open without passages cannot be compressed")
    gold = next((c for c in ctxs if c.get("isgold")), ctxs[0])
    context = f"{gold.get('title', '')}: {gold.get('text', '')}"
    question = _check_text(row["question"], where, "question")
    return Example(f"nq-{index}", "nq", normalize_text(question), context, question, [str(a) for a in answers])


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err})") from None
    return rows


def detect_format(path: Path, first: dict) -> str:
    if "paragraphs" in json.dumps(first)[:2000] or "data" in first:
        return "squad"
    if "supporting_facts" in first or ("answer" in first and "context" in first and "type" in first):
        return "hotpot"
    if "ctxs" in first or ("question" in first and ("answers" in first or "answer" in first)
                           and "context" not in first):
        return "nq"
    if {"id", "context", "question", "answers"} <= set(first):
        return "squad_rows"
    raise DataError(f"{path}: cannot tell the dataset layout from its first record (keys {sorted(first)[:8]}); "
                    "set data.format")


def read_file(spec: str, fmt: str = "auto") -> list[Example]:
    """Read one dataset file into Examples; `NAME:SPLIT` reads split SPLIT of a `datasets` dataset: a hub id such
    as `rajpurkar/squad:train` (needs network or a local HF cache) or a local directory in the HF layout."""
    path = Path(spec).expanduser()
    if not path.exists():
        name, sep, split = spec.rpartition(":")
        if sep and split and (Path(name).expanduser().is_dir() or _looks_like_hub_id(name)):
            return read_hub_dataset(name, split)
        if _looks_like_hub_id(spec):
            raise DataError(f"dataset id {spec!r} names no split: write {spec}:train or {spec}:validation")
        raise DataError(f"dataset file not found: {spec}")
    if path.is_dir():
        raise DataError(f"{spec} is a directory: name a file, or a split of a datasets directory as {spec}:train")
    if path.stat().st_size == 0:
        raise DataError(f"dataset file is empty: {path}")
    if path.suffix == ".json" and fmt in ("auto", "squad"):
        head = path.read_text(encoding="utf-8", errors="replace")[:200].lstrip()
        if head.startswith("{") and '"data"' in path.read_text(encoding="utf-8", errors="replace")[:5000]:
            return read_squad_json(path)
    if path.suffix == ".parquet":
        return _rows_to_examples(path, _read_with_datasets(path, "parquet"), fmt)
    if path.suffix == ".json":
        obj = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        rows = obj if isinstance(obj, list) else obj.get("data", [])
        return _rows_to_examples(path, rows, fmt)
    return _rows_to_examples(path, _read_jsonl(path), fmt)


def _looks_like_hub_id(spec: str) -> bool:
    return "/" in spec and not spec.startswith((".", "/", "~")) and not Path(spec).suffix


def _read_with_datasets(path: Path, kind: str) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(kind, data_files=str(path), split="train"))


def read_hub_dataset(name: str, split: str) -> list[Example]:
    """Split `split` of a `datasets` dataset: a hub id, or a local directory in the HF layout."""
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; re-raise with the culprit named
        raise DataError(f"cannot load split {split!r} of dataset {name!r} (offline, no such split, or not a "
                        f"dataset): {err}") from err
    return _rows_to_examples(Path(f"{name}:{split}"), list(rows), "auto")


def _rows_to_examples(path: Path, rows: list[dict], fmt: str) -> list[Example]:
    if not rows:
        raise DataError(f"{path}: no records")
    kind = detect_format(path, rows[0]) if fmt == "auto" else fmt
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: record {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        if kind in ("squad", "squad_rows"):
            out.append(_squad_row(row, where))
        elif kind == "hotpot":
            out.append(_hotpot_row(row, where))
        else:
            out.append(_nq_row(row, where, i))
    return out


# ----------------------------------------------------------------------------------------------------------------
# split, mixing, order


def normalize_text(text: str) -> str:
    """Lower case, white space collapsed: the form in which two splits are compared by content."""
    return " ".join(text.lower().split())


def split_by_group(examples: list[Example], fraction: float, seed: int,
                   what: str = "held-out") -> tuple[list[Example], list[Example]]:
    """Deterministic split by grouping key (`Example.article`: the article title for SQuAD, the person asked about
    in the toy world, the normalised question for HotpotQA and NQ): whole groups go to the held-out side, so no
    group is shared between the two sides. Returns (rest, held)."""
    groups = sorted({ex.article for ex in examples})
    random.Random(seed).shuffle(groups)
    n_held = max(1, round(len(groups) * fraction)) if len(groups) > 1 else 0
    held_groups = set(groups[:n_held])
    rest = [ex for ex in examples if ex.article not in held_groups]
    held = [ex for ex in examples if ex.article in held_groups]
    if not rest or not held:
        raise DataError(f"cutting the {what} split by group left an empty side ({len(rest)} kept, {len(held)} "
                        f"{what}) from {len(groups)} groups; add data or name the split's files")
    return rest, held


class Splits(NamedTuple):
    """The three disjoint splits: train; validation (periodic evaluation, best checkpoint, every decision taken
    during training); test (the final evaluation only)."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]


def _content_keys(examples: list[Example]) -> tuple[set, set]:
    pairs = {(normalize_text(ex.question), normalize_text(ex.context)) for ex in examples}
    return pairs, {ex.article for ex in examples}


def check_disjoint(splits: Splits) -> None:
    """Raise DataError if two splits share a normalised (question, context) pair or a grouping key."""
    keys = {name: _content_keys(getattr(splits, name)) for name in Splits._fields}
    for i, a in enumerate(Splits._fields):
        for b in Splits._fields[i + 1:]:
            pairs, groups = keys[a][0] & keys[b][0], keys[a][1] & keys[b][1]
            if pairs or groups:
                example = sorted(pairs)[0] if pairs else sorted(groups)[0]
                raise DataError(f"the {a} and {b} splits overlap: {len(pairs)} (question, context) pairs and "
                                f"{len(groups)} grouping keys in common (e.g. {str(example)[:120]!r}); a number "
                                "measured on such a split would not be honest. Use disjoint files.")


def split_digest(examples: list[Example]) -> dict:
    """{"n", "sha256", "content_sha256"} of a split, both order-free. `sha256` is over the sorted example ids, so
    two runs can show they used the same questions; `content_sha256` is over what each example says (id, source,
    context, question, answers), because generated files reuse ids: the toy world's 2-fact and 8-fact validation
    sets are both `toy-validation-000000...`. Whatever must tell two validation sets apart (checkpoints/best
    across a data-curriculum stage) reads `content_sha256`."""
    ids = "\n".join(sorted(ex.id for ex in examples))
    rows = sorted(json.dumps([ex.id, ex.source, ex.context, ex.question, list(ex.answers)], ensure_ascii=False)
                  for ex in examples)
    return {"n": len(examples), "sha256": hashlib.sha256(ids.encode("utf-8")).hexdigest(),
            "content_sha256": hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()}


def split_spec(data_cfg) -> dict:
    """Where each split comes from, without reading anything (what `--dry_run` records)."""
    train_files = data_cfg.train_files or [str(EMBEDDED_SQUAD)]
    test = (list(data_cfg.eval_files) if data_cfg.eval_files
            else f"cut from the training files by group, data.eval_fraction={data_cfg.eval_fraction}")
    val = (list(data_cfg.val_files) if data_cfg.val_files
           else f"cut from the training files by group, data.val_fraction={data_cfg.val_fraction}")
    return {"train": {"files": list(train_files), "minus": "the validation and test groups cut from them"},
            "validation": {"files": val} if isinstance(val, list) else {"cut": val},
            "test": {"files": test} if isinstance(test, list) else {"cut": test}}


def mix(sources: list[list[Example]], weights: list[float], seed: int) -> list[Example]:
    """Deterministic weighted interleave of several datasets (each sampled without replacement, then cycled)."""
    if len(sources) == 1:
        return list(sources[0])
    total = sum(len(s) for s in sources)
    weights = weights or [len(s) for s in sources]
    rng = random.Random(seed)
    cursors = [0] * len(sources)
    out = []
    for _ in range(total):
        i = rng.choices(range(len(sources)), weights=weights)[0]
        out.append(sources[i][cursors[i] % len(sources[i])])
        cursors[i] += 1
    return out


def load_splits(data_cfg) -> Splits:
    """Train, validation and test as `data_cfg` names them (see `split_spec`), checked disjoint by content."""
    files = data_cfg.train_files or [str(EMBEDDED_SQUAD)]
    train = mix([read_file(f, data_cfg.format) for f in files], data_cfg.mix_weights, data_cfg.seed)
    if data_cfg.eval_files:
        test = [ex for f in data_cfg.eval_files for ex in read_file(f, data_cfg.format)]
    else:
        train, test = split_by_group(train, data_cfg.eval_fraction, data_cfg.seed, "test")
    if data_cfg.val_files:
        validation = [ex for f in data_cfg.val_files for ex in read_file(f, data_cfg.format)]
    else:
        train, validation = split_by_group(train, data_cfg.val_fraction, data_cfg.seed + 1, "validation")
    if data_cfg.max_train_examples:
        train = train[: data_cfg.max_train_examples]
    splits = Splits(train, validation, test)
    check_disjoint(splits)
    return splits


def stage_splits(stage, data_cfg, splits: Splits, name: str) -> Splits:
    """The splits of one curriculum.data_stages entry (`name` in errors): its own training files, its own
    validation files (or the run's validation), and the run's test split, all three checked disjoint, and the
    stage's training data also against the run's validation, so no stage ever trains on what the run is judged on."""
    train = mix([read_file(f, data_cfg.format) for f in stage.train_files], [], data_cfg.seed)
    validation = ([ex for f in stage.val_files for ex in read_file(f, data_cfg.format)] if stage.val_files
                  else splits.validation)
    if not train:
        raise ValueError(f"{name}.train_files {stage.train_files}: no training examples")
    if not validation:
        raise ValueError(f"{name}.val_files {stage.val_files}: no validation examples")
    staged = Splits(train, validation, splits.test)
    check_disjoint(staged)
    check_disjoint(Splits(train, splits.validation, []))
    return staged


def example_index(position: int, n: int, seed: int) -> int:
    """Index of the example at stream position `position`: epoch e = position // n reads permutation(seed, e)."""
    epoch, offset = divmod(position, n)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=gen)[offset])


def micro_batch_indices(step: int, micro: int, accum_index: int, grad_accum: int, rank: int, world: int,
                        n: int, seed: int) -> list[int]:
    """Examples of one micro-batch: optimizer step `step` reads stream positions
    [step * G, (step + 1) * G) with G = micro * grad_accum * world, laid out (accum, rank, row)."""
    global_batch = micro * grad_accum * world
    start = step * global_batch + (accum_index * world + rank) * micro
    return [example_index(start + i, n, seed) for i in range(micro)]


# ----------------------------------------------------------------------------------------------------------------
# prompt + collation


def prompt_parts(ex: Example, max_bytes: int) -> tuple[str, str]:
    """(context, question) as `prompt_text` lays them out within max_bytes: the context cut at a UTF-8 boundary
    so the whole prompt fits (the budget baselines start from this same context)."""
    overhead = len(PROMPT_TEMPLATE.format(context="", question=ex.question).encode("utf-8"))
    if len(ex.context.encode("utf-8")) + overhead <= max_bytes:
        return ex.context, ex.question
    return ex.context.encode("utf-8")[:max(0, max_bytes - overhead)].decode("utf-8", errors="ignore"), ex.question


def prompt_text(ex: Example, max_bytes: int, stats: DataStats | None = None) -> str:
    """The prompt string, with the context cut (at a UTF-8 boundary) so the whole prompt fits max_bytes."""
    full = PROMPT_TEMPLATE.format(context=ex.context, question=ex.question)
    encoded = full.encode("utf-8", errors="replace")
    if "\ufffd" in full and stats is not None:
        stats.invalid_utf8 += 1
    if len(encoded) <= max_bytes:
        return full
    if stats is not None:
        stats.prompts_truncated += 1
    overhead = len(PROMPT_TEMPLATE.format(context="", question=ex.question).encode("utf-8"))
    budget = max(0, max_bytes - overhead)
    context = ex.context.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    cut = PROMPT_TEMPLATE.format(context=context, question=ex.question)
    if len(cut.encode("utf-8")) > max_bytes:  # the question alone is too long: cut the whole string
        cut = cut.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return cut


def _pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if left:
            ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, length - len(r):] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask


def to_device(obj, device):
    """A collated batch (nested dicts of tensors) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def answer_span(prompt: str, answer: str) -> tuple[int, int] | None:
    """(first, last) byte offsets of the first occurrence of `answer` inside the CONTEXT of `prompt` (a
    PROMPT_TEMPLATE prompt), last inclusive; None when the answer is empty or not there (e.g. cut off with the
    context). The first occurrence is what extractive-QA training without answer offsets uses; SQuAD's own
    answer_start can point at a later one."""
    encoded, target = prompt.encode("utf-8"), answer.strip().encode("utf-8")
    end = encoded.rfind(QUESTION_LABEL)
    if not target or not encoded.startswith(CONTEXT_LABEL) or end < 0:
        return None
    first = encoded.find(target, len(CONTEXT_LABEL), end)
    return None if first < 0 else (first, first + len(target) - 1)


def collate(examples: list[Example], contracts: dict, max_prompt_bytes: int, k_tokens: int,
            stats: DataStats | None = None) -> dict:
    """Build one training batch.

    Returns {"bytes" (B, L), "byte_mask" (B, L) bool, "ids": [...], "receivers": {name: {...}}} where each
    receiver entry has `latent_ids`/`latent_mask` (B, S) = [BOS?][anchor][answer][EOS], `latent_answer_start`
    (int), `text_ids`/`text_mask` (B, T) = [BOS?][prompt][anchor][answer][EOS], `text_answer_start` (B,) and
    `targets` (B, K) = the first K answer+EOS tokens, -100 past the end. "span" (B, 2) holds the byte offsets of
    the answer's first and last byte in the prompt (`answer_span`; -100 where the context does not contain it).
    """
    prompts = [prompt_text(ex, max_prompt_bytes, stats) for ex in examples]
    byte_ids, byte_mask = bytes_to_tensor([p.encode("utf-8") for p in prompts], max_prompt_bytes)
    batch = {"bytes": byte_ids, "byte_mask": byte_mask, "ids": [ex.id for ex in examples], "receivers": {}}
    spans = [answer_span(p, ex.answers[0]) for p, ex in zip(prompts, examples)]
    batch["span"] = torch.tensor([s if s is not None else (-100, -100) for s in spans], dtype=torch.long)
    for name, contract in contracts.items():
        answers = []
        for ex in examples:
            contract.check_alignment(ex.answers[0])
            answers.append(contract.answer_ids(ex.answers[0]))
        latent_prefix = contract.latent_prefix_ids()
        latent_ids, latent_mask = _pad([latent_prefix + a for a in answers], contract.pad_id)
        text_prefixes = [contract.text_prefix_ids(p) for p in prompts]
        text_ids, text_mask = _pad([t + a for t, a in zip(text_prefixes, answers)], contract.pad_id)
        targets = torch.full((len(examples), k_tokens), -100, dtype=torch.long)
        for i, a in enumerate(answers):
            take = a[:k_tokens]
            targets[i, : len(take)] = torch.tensor(take, dtype=torch.long)
        batch["receivers"][name] = {
            "latent_ids": latent_ids, "latent_mask": latent_mask, "latent_answer_start": len(latent_prefix),
            "text_ids": text_ids, "text_mask": text_mask,
            "text_answer_start": torch.tensor([len(t) for t in text_prefixes], dtype=torch.long),
            "targets": targets,
        }
    return batch
