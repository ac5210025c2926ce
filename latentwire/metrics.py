"""Answer metrics by the official definitions: SQuAD v1.1 EM/F1, HotpotQA answer EM/F1, NQ-open EM.

All three share one answer normalisation (lower-case, drop ASCII punctuation, drop the articles a/an/the as
whole words, collapse white space). EM asks whether the normalised strings are equal; F1 is the harmonic mean of
token precision and recall where tokens are counted as a multiset (a repeated token only matches as many times as
it occurs in both). Both take the best score over all gold answers, and a dataset score is
100 * (sum over every question in the dataset) / (number of questions): a question without a prediction scores 0
and predictions for ids that are not in the dataset are ignored.

Differences between the datasets:
  - SQuAD v1.1: several gold answers per question; the dataset is the official JSON (`data[].paragraphs[].qas[]`).
  - HotpotQA: one gold answer; when either normalised side is "yes", "no" or "noanswer" and they differ, F1 is 0
    (the official script's rule, so "no" vs "no way" earns nothing). The official script reports fractions;
    here, as everywhere in LatentWire, they are percentages.
  - NQ-open: several answer aliases; the official metric is EM only. `f1` is reported as well, as the best token
    F1 over the aliases. Rows have no ids, so predictions are keyed by the question text.

Run:
    python -m latentwire.metrics squad  dev-v1.1.json                  predictions.json
    python -m latentwire.metrics hotpot dev_distractor_part1.jsonl     predictions.json
    python -m latentwire.metrics nq     NQ-open.dev.jsonl              predictions.json
Each prints `{"exact_match": x, "f1": y}` to stdout; notes on unanswered questions go to stderr. A missing file
or one in the wrong layout ends with a message naming the file and the expected layout, and exit status 2.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_HOTPOT_SPECIAL = ("yes", "no", "noanswer")

SQUAD_LAYOUT = '{"version": "1.1", "data": [{"paragraphs": [{"qas": [{"id": str, "answers": [{"text": str}]}]}]}]}'
HOTPOT_LAYOUT = ('jsonl rows {"id": str, "answer": str, ...} (Hugging Face hotpot_qa) '
                 'or a JSON list of {"_id": str, "answer": str, ...} (original release)')
NQ_LAYOUT = 'jsonl rows {"question": str, "answer": [str, ...]} or {"question": str, "answers": [str, ...], ...}'


class MetricsInputError(ValueError):
    """A dataset or prediction input that cannot be read or is not in the expected layout."""


# ---------------------------------------------------------------------------------------------------------------
# Per-answer scores
# ---------------------------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop whole-word a/an/the, collapse white space (SQuAD v1.1 order)."""
    s = s.lower()
    s = s.translate(_DROP_PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _gold_list(golds: str | Iterable[str]) -> list[str]:
    # A bare string is one gold answer; iterating it would silently score against its characters.
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return golds


def _token_f1(pred_norm: str, gold_norm: str) -> float:
    """F1 of two already-normalised strings over token multisets; 0 when nothing overlaps (or either is empty)."""
    pred_tokens = pred_norm.split()
    gold_tokens = gold_norm.split()
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _em_f1(pred: str, golds: str | Iterable[str]) -> tuple[float, float]:
    """(EM, F1), each the best over the gold answers, normalising every string once."""
    pred_norm = normalize_answer(pred)
    gold_norms = [normalize_answer(g) for g in _gold_list(golds)]
    em = float(any(pred_norm == g for g in gold_norms))
    return em, max(_token_f1(pred_norm, g) for g in gold_norms)


def exact_match(pred: str, golds: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred_norm = normalize_answer(pred)
    return float(any(pred_norm == normalize_answer(g) for g in _gold_list(golds)))


def f1_score(pred: str, golds: str | Iterable[str]) -> float:
    """Best token-multiset F1 in [0, 1] of the prediction against any gold answer."""
    pred_norm = normalize_answer(pred)
    return max(_token_f1(pred_norm, normalize_answer(g)) for g in _gold_list(golds))


def em_f1_batch(preds: Sequence[str], golds: Sequence[str | Sequence[str]]) -> tuple[float, float]:
    """Mean EM and F1 as percentages: `preds[i]` (the system's answer) against `golds[i]` (one or more answers)."""
    if len(preds) != len(golds):
        raise ValueError(f"em_f1_batch: {len(preds)} predictions but {len(golds)} gold entries")
    if not preds:
        raise ValueError("em_f1_batch: no examples to score")
    em_sum = f1_sum = 0.0
    for pred, gold in zip(preds, golds):
        em, f1 = _em_f1(pred, gold)
        em_sum += em
        f1_sum += f1
    return 100.0 * em_sum / len(preds), 100.0 * f1_sum / len(preds)


def hotpot_em_f1(pred: str, gold: str) -> tuple[float, float]:
    """HotpotQA answer (EM, F1) in [0, 1]: F1 is 0 when a differing side is yes / no / noanswer."""
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    em = float(pred_norm == gold_norm)
    if pred_norm != gold_norm and (pred_norm in _HOTPOT_SPECIAL or gold_norm in _HOTPOT_SPECIAL):
        return em, 0.0
    return em, _token_f1(pred_norm, gold_norm)


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------


def _read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MetricsInputError(f"{path}: cannot read file ({e.strerror or e})") from e
    if raw[:2] == b"\x1f\x8b":  # gzip magic, e.g. nq-open-oracle.jsonl.gz
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise MetricsInputError(f"{path}: corrupt gzip file ({e})") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MetricsInputError(f"{path}: not UTF-8 text ({e})") from e


def _load_json(path: str | Path, expected: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise MetricsInputError(f"{path}: not valid JSON ({e}); expected {expected}") from e


def _load_rows(path: str | Path, expected: str) -> list[Any]:
    """A JSON list (file starts with '[') or JSON lines (one value per non-empty line)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise MetricsInputError(f"{path}: not valid JSON ({e}); expected {expected}") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MetricsInputError(f"{path}, line {lineno}: not valid JSON ({e}); expected {expected}") from e
    return rows


def _layout_error(source: str, where: str, what: str, expected: str) -> MetricsInputError:
    return MetricsInputError(f"{source}: {where}: {what}; expected {expected}")


def _check_predictions(predictions: Any, source: str, expected: str) -> dict[str, str]:
    if not isinstance(predictions, Mapping):
        raise MetricsInputError(f"{source}: got {type(predictions).__name__}; expected {expected}")
    for key, value in predictions.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MetricsInputError(f"{source}: entry {key!r} maps to {type(value).__name__}, not an answer "
                                    f"string; expected {expected}")
    return dict(predictions)


def _report_unanswered(task: str, missing: list[str], total: int, answered_any: bool) -> None:
    if not missing:
        return
    shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
    print(f"{task}: {len(missing)} of {total} questions have no prediction and score 0 ({shown})", file=sys.stderr)
    if not answered_any:
        print(f"{task}: no prediction matches any question; is the predictions file for this dataset?",
              file=sys.stderr)


def _scores(em_sum: float, f1_sum: float, total: int) -> dict[str, float]:
    # Accumulate in dataset order and divide once, as the official scripts do, so figures agree to the last bit.
    return {"exact_match": 100.0 * em_sum / total, "f1": 100.0 * f1_sum / total}


def _score_all(task: str, items: list[tuple[str, Any]], predictions: Mapping[str, str], score) -> dict[str, float]:
    """Mean EM/F1 in percent over `items` [(key, gold)], scoring `score(prediction, gold)`; a key without a
    prediction scores 0 (and is reported)."""
    em_sum = f1_sum = 0.0
    missing = []
    for key, gold in items:
        if key not in predictions:
            missing.append(key)
            continue
        em, f1 = score(predictions[key], gold)
        em_sum += em
        f1_sum += f1
    _report_unanswered(task, missing, len(items), len(missing) < len(items))
    return _scores(em_sum, f1_sum, len(items))


# ---------------------------------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------------------------------


def squad_questions(dataset: Any, source: str = "dataset") -> list[tuple[str, list[str]]]:
    """(id, gold answer texts) for every question of an official SQuAD v1.1 JSON object, in file order."""
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("data"), list):
        raise _layout_error(source, "top level", "no 'data' list", SQUAD_LAYOUT)
    if dataset.get("version") != "1.1":
        print(f"squad: {source} has version {dataset.get('version')!r}; this evaluates SQuAD v1.1",
              file=sys.stderr)
    questions = []
    for a, article in enumerate(dataset["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, Mapping) else None
        if not isinstance(paragraphs, list):
            raise _layout_error(source, f"data[{a}]", "no 'paragraphs' list", SQUAD_LAYOUT)
        for p, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, Mapping) else None
            if not isinstance(qas, list):
                raise _layout_error(source, f"data[{a}].paragraphs[{p}]", "no 'qas' list", SQUAD_LAYOUT)
            for q, qa in enumerate(qas):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, Mapping) or not isinstance(qa.get("id"), str):
                    raise _layout_error(source, where, "no string 'id'", SQUAD_LAYOUT)
                answers = qa.get("answers")
                if not isinstance(answers, list) or not all(
                        isinstance(x, Mapping) and isinstance(x.get("text"), str) for x in answers):
                    raise _layout_error(source, where, "'answers' is not a list of {'text': str}", SQUAD_LAYOUT)
                if not answers:
                    raise _layout_error(source, where, f"question {qa['id']} has no gold answer (a SQuAD v2.0 "
                                        "unanswerable question?)", SQUAD_LAYOUT)
                questions.append((qa["id"], [x["text"] for x in answers]))
    if not questions:
        raise _layout_error(source, "data", "no questions", SQUAD_LAYOUT)
    return questions


def squad_evaluate(dataset: Any, predictions: Mapping[str, str] | str | Path) -> dict[str, float]:
    """SQuAD v1.1 {"exact_match", "f1"} in percent. `dataset` is the official JSON object or its path;
    `predictions` maps question id -> answer text (or is the path of such a JSON file)."""
    source = "dataset"
    if isinstance(dataset, (str, Path)):
        source, dataset = str(dataset), _load_json(dataset, SQUAD_LAYOUT)
    pred_source = "predictions"
    if isinstance(predictions, (str, Path)):
        pred_source, predictions = str(predictions), _load_json(predictions, '{"question id": "answer text"}')
    predictions = _check_predictions(predictions, pred_source, '{"question id": "answer text"}')

    return _score_all("squad", squad_questions(dataset, source), predictions, _em_f1)


# ---------------------------------------------------------------------------------------------------------------
# HotpotQA
# ---------------------------------------------------------------------------------------------------------------


def hotpot_answers(path_or_rows: Any) -> list[tuple[str, str]]:
    """(id, gold answer) per row. Accepts a path (HF jsonl rows or the original JSON list), a list of paths,
    or the rows themselves (dicts with `id` or `_id`, and `answer`)."""
    if isinstance(path_or_rows, (str, Path)):
        sources = [(str(path_or_rows), _load_rows(path_or_rows, HOTPOT_LAYOUT))]
    elif isinstance(path_or_rows, Sequence) and path_or_rows and all(
            isinstance(x, (str, Path)) for x in path_or_rows):
        sources = [(str(p), _load_rows(p, HOTPOT_LAYOUT)) for p in path_or_rows]
    else:
        sources = [("rows", path_or_rows)]
    answers = []
    for source, rows in sources:
        if not isinstance(rows, list):
            raise MetricsInputError(f"{source}: got {type(rows).__name__}; expected {HOTPOT_LAYOUT}")
        for i, row in enumerate(rows):
            qid = (row.get("id", row.get("_id")) if isinstance(row, Mapping) else None)
            if not isinstance(qid, str) or not isinstance(row.get("answer"), str):
                raise _layout_error(source, f"row {i}", "no string 'id'/'_id' and 'answer'", HOTPOT_LAYOUT)
            answers.append((qid, row["answer"]))
        if not rows:
            raise _layout_error(source, "top level", "no rows", HOTPOT_LAYOUT)
    return answers


def hotpot_evaluate(path_or_rows: Any, predictions: Mapping[str, Any] | str | Path) -> dict[str, float]:
    """HotpotQA answer {"exact_match", "f1"} in percent. `predictions` is {id: answer} or the official
    {"answer": {id: answer}, "sp": ...} layout (or the path of either)."""
    expected = '{"id": "answer"} or {"answer": {"id": "answer"}, "sp": {...}}'
    pred_source = "predictions"
    if isinstance(predictions, (str, Path)):
        pred_source, predictions = str(predictions), _load_json(predictions, expected)
    if isinstance(predictions, Mapping) and isinstance(predictions.get("answer"), Mapping):
        predictions = predictions["answer"]
    predictions = _check_predictions(predictions, pred_source, expected)

    return _score_all("hotpot", hotpot_answers(path_or_rows), predictions, hotpot_em_f1)


# ---------------------------------------------------------------------------------------------------------------
# NQ-open
# ---------------------------------------------------------------------------------------------------------------


def nq_answers(path_or_rows: Any) -> list[tuple[str, list[str]]]:
    """(question, answer aliases) per row of NQ-open jsonl (`answer`) or the oracle jsonl(.gz) (`answers`)."""
    source, rows = "rows", path_or_rows
    if isinstance(path_or_rows, (str, Path)):
        source, rows = str(path_or_rows), _load_rows(path_or_rows, NQ_LAYOUT)
    if not isinstance(rows, list) or not rows:
        raise MetricsInputError(f"{source}: no rows; expected {NQ_LAYOUT}")
    out = []
    for i, row in enumerate(rows):
        aliases = None
        if isinstance(row, Mapping):
            aliases = row.get("answer", row.get("answers"))
        if (not isinstance(row, Mapping) or not isinstance(row.get("question"), str)
                or not isinstance(aliases, list) or not aliases or not all(isinstance(a, str) for a in aliases)):
            raise _layout_error(source, f"row {i}", "no string 'question' with a non-empty list of answer strings",
                                NQ_LAYOUT)
        out.append((row["question"].strip(), aliases))
    return out


def _nq_predictions(predictions: Any) -> dict[str, str]:
    expected = '{"question": "answer"} or rows {"question": str, "prediction": str}'
    source = "predictions"
    if isinstance(predictions, (str, Path)):
        source, text = str(predictions), _read_text(predictions)
        try:
            predictions = json.loads(text)
        except json.JSONDecodeError:
            predictions = _load_rows(predictions, expected)
        # A one-line JSON-lines file parses as a single row object.
        if isinstance(predictions, Mapping) and set(predictions) == {"question", "prediction"}:
            predictions = [predictions]
    if isinstance(predictions, list):
        pairs = {}
        for i, row in enumerate(predictions):
            if not (isinstance(row, Mapping) and isinstance(row.get("question"), str)
                    and isinstance(row.get("prediction"), str)):
                raise _layout_error(source, f"row {i}", "no string 'question' and 'prediction'", expected)
            pairs[row["question"]] = row["prediction"]
        predictions = pairs
    predictions = _check_predictions(predictions, source, expected)
    return {q.strip(): a for q, a in predictions.items()}


def nq_evaluate(path_or_rows: Any, predictions: Any) -> dict[str, float]:
    """NQ-open {"exact_match", "f1"} in percent, keyed by question text (surrounding white space ignored).
    EM is the official metric; f1 is the best token F1 over the aliases, an extra."""
    predictions = _nq_predictions(predictions)
    return _score_all("nq", nq_answers(path_or_rows), predictions, _em_f1)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentwire.metrics", description=__doc__.split("\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    for name, help_text in (("squad", "SQuAD v1.1: official dev JSON, predictions {id: answer}"),
                            ("hotpot", "HotpotQA: jsonl rows or original JSON, predictions {id: answer} "
                                       "or {\"answer\": {...}}"),
                            ("nq", "NQ-open: jsonl(.gz) rows, predictions {question: answer} "
                                   "(f1 = best over aliases; EM is the official metric)")):
        sub = tasks.add_parser(name, help=help_text)
        sub.add_argument("dataset", help="dataset file")
        sub.add_argument("predictions", help="predictions file")
    args = parser.parse_args(argv)
    evaluate = {"squad": squad_evaluate, "hotpot": hotpot_evaluate, "nq": nq_evaluate}[args.task]
    try:
        result = evaluate(args.dataset, args.predictions)
    except MetricsInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
