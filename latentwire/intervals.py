"""95% intervals for the EM / F1 of an evaluation: a percentile bootstrap over its examples.

`add_intervals(result, rows)` takes what `latentwire.eval.evaluate` returns and adds, next to every receiver and
path's `em` and `f1`, `em_ci95` and `f1_ci95` = [low, high] (percentages, like the numbers they bound). The
per-example scores are recomputed from `predictions.jsonl`'s rows with the same official metric, and must give the
reported means back (an error otherwise, so an interval never bounds another number).

The bootstrap resamples the examples with replacement (`RESAMPLES` times, a fixed seed, so the same predictions
always give the same interval) and takes the 2.5th and 97.5th percentiles of the mean. With n examples its width is
about 4 standard errors: +-10 points for an EM near 40% on 100 questions. It is an interval over the questions
that happened to be asked, not over training runs or prompts.

    python -c "from latentwire.intervals import bootstrap_ci; print(bootstrap_ci([1.0, 0.0, 1.0, 1.0]))"
"""

from __future__ import annotations

import math

import torch

from latentwire import metrics

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def bootstrap_ci(values: list[float], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> list[float]:
    """Percentile-bootstrap interval [low, high] of the mean of `values` (n,); [v, v] for a single value."""
    if not values:
        raise ValueError("a bootstrap interval needs at least one value")
    x = torch.tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (resamples, len(values)), generator=gen)
    means = x[idx].mean(dim=1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return [low, high]


def per_example_scores(rows: list[dict], name: str, path: str) -> tuple[list[float], list[float]]:
    """(EM, F1) per example (0..1) of receiver `name` on `path`, from predictions rows (id, answers, predictions)."""
    em, f1 = [], []
    for row in rows:
        pred = row["predictions"][name][path]
        em.append(float(metrics.exact_match(pred, row["answers"])))
        f1.append(float(metrics.f1_score(pred, row["answers"])))
    return em, f1


def add_intervals(result: dict, rows: list[dict]) -> dict:
    """Add `em_ci95` / `f1_ci95` (percent) next to `em` / `f1` of every receiver and path in `result`, in place."""
    for name in result["receivers"]:
        for path in result["paths"]:
            entry = result[name][path]
            em, f1 = per_example_scores(rows, name, path)
            for key, scores in (("em", em), ("f1", f1)):
                mean = 100.0 * sum(scores) / len(scores)
                if not math.isclose(mean, entry[key], abs_tol=1e-6):
                    raise ValueError(f"{name}/{path}: {key} recomputed from the predictions is {mean}, the "
                                     f"evaluation reported {entry[key]}")
                entry[f"{key}_ci95"] = [100.0 * v for v in bootstrap_ci(scores)]
    result["intervals"] = {"method": "percentile bootstrap over examples", "resamples": RESAMPLES, "seed": SEED,
                           "level": LEVEL, "keys": ["em_ci95", "f1_ci95"]}
    return result


def interval_table(result: dict) -> str:
    """Markdown table: receiver x path, EM and F1 each with its 95% interval, NLL, n."""
    lines = [f"split: {result.get('split', '?')}, n = {result['n_examples']}", "",
             "| receiver | path | EM [95% CI] | F1 [95% CI] | NLL |", "|---|---|---|---|---|"]
    for name in result["receivers"]:
        for path in result["paths"]:
            e = result[name][path]
            em, f1 = e.get("em_ci95", [math.nan] * 2), e.get("f1_ci95", [math.nan] * 2)
            lines.append(f"| {name} | {path} | {e['em']:.1f} [{em[0]:.1f}, {em[1]:.1f}] | "
                         f"{e['f1']:.1f} [{f1[0]:.1f}, {f1[1]:.1f}] | {e['nll']:.2f} |")
    return "\n".join(lines)
