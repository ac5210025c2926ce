"""Evaluate a LatentWire checkpoint, rebuilt from the checkpoint directory alone.

    python launch/eval.py --checkpoint runs/demo/checkpoints/latest --output_dir runs/demo/eval2 \
        [--set eval.max_examples=8 ...] [--metrics_jsonl runs/demo/metrics.jsonl] [--no_plots]

Writes into OUT:
    metrics.json       per receiver and path (text, latent, latent_<precision>, token_budget, byte_budget,
                       embed_raw, embed_anchor, embed_resampled): em, f1, nll, first_tok_top1/top5, bytes, n,
                       by_source; top level: wire, latency, features, data, paths
    predictions.jsonl  per example: id, source, gold answers, every receiver's prediction on every path
    report.md          one results table per dataset, the wire and latency tables
    em_by_path.png     EM / F1 per path and receiver
    training_curves.png  from the run's metrics.jsonl (found next to checkpoints/ unless --metrics_jsonl is given)
and prints the results table. The examples are the checkpoint config's TEST split (data.eval_files, or the groups
cut from data.train_files) unless `--split validation` asks for the validation split (model selection);
`--set data.eval_files=[...]` evaluates other files. metrics.json records which split it read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def default_metrics_jsonl(checkpoint: str) -> Path | None:
    """RUN/metrics.jsonl for a checkpoint at RUN/checkpoints/<step or link>."""
    candidate = Path(checkpoint).absolute().parent.parent / "metrics.jsonl"
    return candidate if candidate.is_file() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/checkpoints/latest)")
    parser.add_argument("--output_dir", required=True, help="where metrics.json, predictions.jsonl, report.md go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--metrics_jsonl", default=None, help="training metrics.jsonl for the curves plot")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="test (the reported numbers, default) or validation (model selection)")
    args = parser.parse_args(argv)

    from latentwire import config as config_lib
    from latentwire.data import load_splits
    from latentwire.checkpoint import load_checkpoint_model
    from latentwire.eval import evaluate, format_table, write_outputs
    from latentwire.features import active as active_features

    try:
        cfg, model = load_checkpoint_model(args.checkpoint, args.set)
    except config_lib.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    examples = getattr(load_splits(cfg.data), args.split)
    result, rows = evaluate(model, examples, features=active_features(cfg), split=args.split)
    curves = args.metrics_jsonl or default_metrics_jsonl(args.checkpoint)
    out = write_outputs(result, rows, args.output_dir, curves, plots=not args.no_plots)
    print(format_table(result))
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
