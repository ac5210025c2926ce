"""Run an ablation sweep: a grid of `--set` overrides, one normal training run each, then one results table.

    python launch/sweep.py --config configs/ablation/features.json [--output_dir runs/sweeps/features]
                           [--set train.max_steps=8 ...] [--dry_run]

A sweep file names a base preset, overrides shared by every run, and the variants:

    {"config": "configs/tiny.json",                  base preset (as for launch/train.py --config)
     "set": ["train.max_steps=12"],                  overrides of every run
     "runs": {"baseline": [], "lora": ["features.lora=true"]},     named variants (optional)
     "grid": {"losses.kd_weight": [0.0, 0.5]}}       cartesian product (optional; crossed with "runs")

Each variant trains in OUT/<name>/ (a normal run directory, evaluated at the end), one after another; a variant
whose eval/metrics.json exists is not rerun. OUT/results.csv and OUT/results.md hold one row per variant with the
final metrics (latent and text EM/F1, first-token top-1, NLL per receiver, final loss, active features). --dry_run
prints the commands only. The exit status is non-zero if any run failed (its row says so).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = (("latent", "em"), ("latent", "f1"), ("latent", "first_tok_top1"), ("latent", "nll"), ("text", "em"),
           ("text", "f1"))


def _value_text(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def expand(sweep: dict) -> list[tuple[str, list[str]]]:
    """Sweep spec -> [(variant name, overrides)] in a fixed order; names are unique and path-safe."""
    unknown = sorted(set(sweep) - {"config", "set", "runs", "grid", "description"})
    if unknown:
        raise ValueError(f"sweep file: unknown key(s) {unknown}; expected config, set, runs, grid, description")
    common = list(sweep.get("set", []))
    runs = sweep.get("runs") or {"": []}
    grid = sweep.get("grid") or {}
    keys = list(grid)
    variants = []
    for run_name, run_sets in runs.items():
        for values in itertools.product(*(grid[k] for k in keys)):
            grid_sets = [f"{k}={_value_text(v)}" for k, v in zip(keys, values)]
            parts = ([run_name] if run_name else []) + [f"{k.split('.')[-1]}={_value_text(v)}"
                                                        for k, v in zip(keys, values)]
            name = "_".join(parts) or "base"
            name = "".join(c if c.isalnum() or c in "-_=." else "-" for c in name)
            variants.append((name, common + list(run_sets) + grid_sets))
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep file: variant names collide: {names}")
    return variants


def train_command(base_config: str, out: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "launch/train.py", "--config", base_config, "--output_dir", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def collect(name: str, run_dir: Path, status: str) -> dict:
    """One results row from a finished run directory (eval/metrics.json and the last metrics.jsonl row)."""
    row = {"run": name, "status": status}
    metrics_path = run_dir / "eval" / "metrics.json"
    if not metrics_path.is_file():
        return row
    metrics = json.loads(metrics_path.read_text())
    row["features"] = "+".join(metrics.get("features", [])) or "-"
    for receiver in metrics["receivers"]:
        for path, key in METRICS:
            if key in metrics[receiver].get(path, {}):
                row[f"{receiver}/{path}_{key}"] = round(float(metrics[receiver][path][key]), 4)
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    if lines:
        last = json.loads(lines[-1])
        row["final_loss"] = round(float(last["loss"]), 4)
        row["steps"] = last["step"]
    return row


def write_tables(rows: list[dict], out: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep file, e.g. configs/ablation/features.json")
    parser.add_argument("--output_dir", default=None, help="sweep directory (default runs/sweeps/<sweep name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)

    sweep_path = Path(args.config)
    try:
        sweep = json.loads(sweep_path.read_text())
        variants = expand(sweep)
    except (OSError, json.JSONDecodeError, ValueError) as err:
        print(f"sweep error: {sweep_path}: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir or ROOT / "runs" / "sweeps" / sweep_path.stem)
    base = sweep.get("config", "configs/tiny.json")
    plan = [(name, out / name, overrides + args.set) for name, overrides in variants]
    if args.dry_run:
        for name, run_dir, overrides in plan:
            print(f"[{name}] " + " ".join(train_command(base, run_dir, overrides)[1:]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for i, (name, run_dir, overrides) in enumerate(plan):
        if (run_dir / "eval" / "metrics.json").is_file():
            print(f"[{i + 1}/{len(plan)}] {name}: done already", flush=True)
            rows.append(collect(name, run_dir, "ok"))
            continue
        print(f"[{i + 1}/{len(plan)}] {name}: training in {run_dir}", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(train_command(base, run_dir, overrides), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        status = "ok" if rc == 0 else f"failed (exit {rc}, see {name}.log)"
        failed += rc != 0
        rows.append(collect(name, run_dir, status))
        write_tables(rows, out)  # partial tables survive an interrupted sweep
    write_tables(rows, out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
