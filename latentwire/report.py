"""Evaluation reports: `report.md` (one results table per dataset, the wire and latency tables) and PNG plots.

    em_by_path.png       EM and F1 per path, one bar per receiver
    em_vs_bytes.png      per receiver, EM against the mean bytes each path sends: the latent at every wire
                         precision, the text cut to the same bytes (byte_budget*), the full text; the text's
                         UTF-8, zstd and zstd+dictionary sizes as vertical lines
    training_curves.png  from the run's metrics.jsonl: loss parts (loss, ce/*, kd/*), first-token accuracy, lr,
                         and the periodic validation metric (eval/*) when training logged one

`launch/eval.py` writes them next to metrics.json; rebuild them from a finished evaluation with
    python -m latentwire.report OUT/metrics.json [--metrics_jsonl RUN/metrics.jsonl]
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPORT_FILE = "report.md"
EM_PLOT = "em_by_path.png"
CURVES_PLOT = "training_curves.png"
BYTES_PLOT = "em_vs_bytes.png"
CONTRACT_PATHS = ("text", "latent", "token_budget", "closed_book")  # the paths every metrics.json has (older ones lack "paths")


def _paths(result: dict) -> list[str]:
    return list(result.get("paths", CONTRACT_PATHS))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(result: dict, source: str | None = None) -> str:
    """Markdown table receiver x path: EM, F1, first-token top-1/top-5, NLL, mean bytes the path transmits.

    With `source`, the numbers of that dataset only (`by_source`)."""
    lines = ["| receiver | path | EM | F1 | FirstTok@1 | FirstTok@5 | NLL | bytes |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in result["receivers"]:
        for path in _paths(result):
            e = result[name][path]
            if source is not None:
                e = e["by_source"][source]
            lines.append(f"| {name} | {path} | {e['em']:.2f} | {e['f1']:.2f} | {e['first_tok_top1']:.1f} | "
                         f"{e['first_tok_top5']:.1f} | {e['nll']:.3f} | {_fmt(e.get('bytes'), '.0f')} |")
    return "\n".join(lines)


def wire_line(result: dict) -> str:
    w = result["wire"]
    sizes = ", ".join(f"{p} {b:.0f} B" for p, b in w["latent_bytes"].items())
    comp = ", ".join(f"{n} {c:.1f}x" for n, c in w["token_compression"].items())
    return (f"wire: {w['latent_slots']} slots x {w['latent_dim']} dims -> {sizes}; text {w['text_bytes_utf8']:.0f} B "
            f"UTF-8, {w['text_bytes_zstd']:.0f} B zstd; token compression {comp} ({result['n_examples']} examples)")


def wire_table(result: dict) -> str:
    """Per precision: mean real payload bytes, the ideal slots*dim*bits/8, and the ratio to the text bytes."""
    w = result["wire"]
    ideal = w.get("latent_bytes_ideal", {})
    lines = ["| precision | payload B (mean) | ideal B | payload / ideal | payload / text UTF-8 | "
             "payload / text zstd |", "|---|---:|---:|---:|---:|---:|"]
    for p, b in w["latent_bytes"].items():
        ratio = f"{b / ideal[p]:.3f}" if ideal.get(p) else "-"
        lines.append(f"| {p} | {b:.0f} | {_fmt(ideal.get(p), '.0f')} | {ratio} | {b / w['text_bytes_utf8']:.3f} | "
                     f"{b / w['text_bytes_zstd']:.3f} |")
    return "\n".join(lines)


def latency_table(result: dict) -> str:
    lat = result.get("latency") or {}
    if not lat:
        return "(latency not measured)"
    lines = ["| receiver | path | prefill ms (median) | prefill ms (p90) | decode ms/token (median) | "
             "decode ms/token (p90) |", "|---|---|---:|---:|---:|---:|"]
    for name in result["receivers"]:
        for path in _paths(result):
            e = lat[name][path]
            lines.append(f"| {name} | {path} | {e['prefill_ms']['median']:.2f} | {e['prefill_ms']['p90']:.2f} | "
                         f"{e['decode_ms_per_token']['median']:.2f} | {e['decode_ms_per_token']['p90']:.2f} |")
    return "\n".join(lines)


def report_markdown(result: dict) -> str:
    data = result.get("data", {})
    sources = data.get("sources", {})
    parts = ["# LatentWire evaluation", "",
             f"{result['n_examples']} {result.get('split', 'held-out')} examples; latent paths decode the real `{result['wire_precision']}` "
             "payload (`latent_<precision>` the others); greedy decoding to EOS or max_new_tokens. EM/F1 in %, "
             "first-token accuracy in %, NLL per answer token (answer + EOS), bytes = mean bytes the path sends."]
    if len(sources) > 1:
        parts += ["", f"## All datasets ({result['n_examples']} examples)", "", results_table(result)]
    for src, n in sources.items():
        cut = data.get("prompts_truncated", {}).get(src, 0)
        parts += ["", f"## {src} ({n} examples, {cut} prompts cut to {data.get('max_prompt_bytes')} bytes)", "",
                  results_table(result, src)]
    if not sources:
        parts += ["", results_table(result)]
    parts += ["", "## Wire", "", wire_line(result), "", wire_table(result), "", "## Quality against bytes", "",
              bytes_table(result),
              "", "## Latency", "", latency_table(result)]
    if result.get("features"):
        parts += ["", f"Active features: {', '.join(result['features'])}"]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bytes_points(result: dict, name: str) -> list[tuple[str, float, float, float]]:
    """(path, mean bytes sent, EM, F1) of every latent and text path of `name` that sends bytes."""
    points = []
    for p in _paths(result):
        if p.startswith(("latent", "byte_budget")) or p == "text":
            e = result[name][p]
            points.append((p, e.get("bytes", 0.0), e["em"], e["f1"]))
    return points


def bytes_table(result: dict) -> str:
    """Per receiver and path: mean bytes sent, EM, F1; the text's compressed sizes underneath."""
    lines = ["| receiver | path | bytes sent | EM | F1 |", "|---|---|---:|---:|---:|"]
    for name in result["receivers"]:
        for p, nbytes, em, f1 in sorted(_bytes_points(result, name), key=lambda t: t[1]):
            lines.append(f"| {name} | {p} | {nbytes:.0f} | {em:.2f} | {f1:.2f} |")
    w = result["wire"]
    sizes = [f"UTF-8 {w['text_bytes_utf8']:.0f} B", f"zstd-19 {w['text_bytes_zstd']:.0f} B"]
    if w.get("text_bytes_zstd_dict"):
        sizes.append(f"zstd-19 + a {w['zstd_dict_bytes']} B dictionary trained on the training prompts "
                     f"{w['text_bytes_zstd_dict']:.0f} B (the dictionary is shared state, not counted per example)")
    return "\n".join(lines) + "\n\nThe full prompt: " + "; ".join(sizes) + "."


def plot_em_vs_bytes(result: dict, path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    names = result["receivers"]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    w = result["wire"]
    for ax, name in zip(axes[0], names):
        points = _bytes_points(result, name)
        for kind, marker in (("latent", "o"), ("byte_budget", "s"), ("text", "*")):
            sel = [pt for pt in points if pt[0].startswith(kind)]
            ax.scatter([pt[1] for pt in sel], [pt[2] for pt in sel], marker=marker, s=60, label=kind)
            for pt in sel:
                ax.annotate(pt[0].replace("byte_budget", "bb").replace("latent", "lat"), (pt[1], pt[2]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        lines = [("UTF-8", w["text_bytes_utf8"]), ("zstd", w["text_bytes_zstd"]),
                 ("zstd+dict", w.get("text_bytes_zstd_dict"))]
        for (label, x), style in zip(lines, ("-", "--", ":")):
            if x:
                ax.axvline(x, color="gray", linestyle=style, label=f"text {label} {x:.0f} B")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ... bytes
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # the log axis's minor labels overprint each other
        ax.set_xlabel("mean bytes sent per example (payload with header / text bytes)")
        ax.set_ylabel("EM (%)")
        ax.set_title(f"{name}: EM against bytes ({result['n_examples']} {result.get('split', '')} examples)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_em_by_path(result: dict, path: Path) -> Path:
    plt = _pyplot()
    paths, names = _paths(result), result["receivers"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(paths)), 4), sharey=True)
    width = 0.8 / len(names)
    for ax, key in zip(axes, ("em", "f1")):
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(paths))]
            ax.bar(xs, [result[name][p][key] for p in paths], width, label=name)
        top = max(result[n][p][key] for n in names for p in paths)
        ax.set_ylim(0, max(1.0, 1.15 * top))  # an all-zero result still draws a readable axis
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels(paths, rotation=35, ha="right")
        ax.set_title(f"{key.upper()} per path ({result['n_examples']} examples)")
        ax.set_ylabel(f"{key.upper()} (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(rows: list[dict], path: Path) -> Path | None:
    """One panel per group of logged series; groups with no values are left out (None if nothing to plot)."""
    plt = _pyplot()
    keys = sorted({k for r in rows for k in r})
    panels = [("loss parts", ["loss"] + [k for k in keys if k.startswith(("ce/", "kd/"))]),
              ("first-token accuracy (train)", [k for k in keys if k.startswith("first_tok_acc/")]),
              ("learning rate", ["lr"])]
    held_out = [k for k in keys if k.startswith("eval/") and k.count("/") == 1]
    if held_out:
        panels.append(("validation (periodic eval)", held_out))
    panels = [(title, [k for k in series if any(r.get(k) is not None for r in rows)]) for title, series in panels]
    panels = [(title, series) for title, series in panels if series]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for key in series:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("eval/") else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1 or series[0].startswith("eval/"):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: str | Path, metrics_jsonl: str | Path | None = None,
                 plots: bool = True) -> list[Path]:
    """report.md (+ em_by_path.png, + training_curves.png when metrics_jsonl has rows) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT_FILE]
    written[0].write_text(report_markdown(result))
    if plots:
        written.append(plot_em_by_path(result, out / EM_PLOT))
        written.append(plot_em_vs_bytes(result, out / BYTES_PLOT))
        rows = read_metrics_jsonl(Path(metrics_jsonl)) if metrics_jsonl and Path(metrics_jsonl).is_file() else []
        curves = plot_training_curves(rows, out / CURVES_PLOT) if rows else None
        if curves is not None:
            written.append(curves)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="an evaluation's metrics.json")
    parser.add_argument("--metrics_jsonl", default=None, help="the training run's metrics.jsonl (training curves)")
    parser.add_argument("--out", default=None, help="output directory (default: next to metrics.json)")
    args = parser.parse_args(argv)
    metrics_path = Path(args.metrics)
    result = json.loads(metrics_path.read_text())
    for path in write_report(result, Path(args.out or metrics_path.parent), args.metrics_jsonl):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
