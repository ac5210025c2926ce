"""Evaluate a LatentWire checkpoint, rebuilt from the checkpoint directory alone.

    python launch/eval.py --checkpoint runs/demo/checkpoints/latest --output_dir runs/demo/eval2 \
        [--set eval.max_examples=8 ...] [--metrics_jsonl runs/demo/metrics.jsonl] [--no_plots]
    python launch/eval.py --baseline --config configs/small_real.json --output_dir runs/small_real/baseline

`--baseline --config C` needs no checkpoint: it evaluates only the text-side paths (text, token_budget,
byte_budget[_<precision>], closed_book) of the receivers C names. The encoder is freshly initialised and serves only
to size the byte budgets: a payload's length depends on the slots, d_z and the precision, never on the values.

Writes into OUT:
    metrics.json       per receiver and path (text, latent, latent_<precision>, token_budget, byte_budget,
                       embed_raw, embed_anchor, embed_resampled): em, f1, nll, first_tok_top1/top5, bytes, n,
                       by_source; top level: wire, latency, features, data, paths, device ("cuda": this
                       process's GPU when there is one, latency synchronized; else "cpu")
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


def baseline_model(config: str, overrides: list[str]):
    """(cfg, LatentWire) for --baseline: `config`'s frozen receivers and a freshly initialised encoder (seeded
    by train.seed), which only sizes the byte budgets."""
    import torch

    from latentwire import config as config_lib
    from latentwire.model import LatentWire
    from latentwire.receivers import Receiver

    cfg = config_lib.load_config(config, overrides)
    receivers = [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]
    torch.manual_seed(cfg.train.seed)
    return cfg, LatentWire(cfg, receivers).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (e.g. RUN/checkpoints/latest)")
    parser.add_argument("--baseline", action="store_true",
                        help="no checkpoint: evaluate the text-side paths of --config's receivers")
    parser.add_argument("--config", default=None, help="the JSON preset --baseline reads")
    parser.add_argument("--no_latency", action="store_true",
                        help="skip the latency timing (a second, fixed-length decode per batch and path)")
    parser.add_argument("--output_dir", required=True, help="where metrics.json, predictions.jsonl, report.md go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--metrics_jsonl", default=None, help="training metrics.jsonl for the curves plot")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="test (the reported numbers, default) or validation (model selection)")
    args = parser.parse_args(argv)
    if args.baseline != (args.checkpoint is None) or args.baseline != (args.config is not None):
        parser.error("give either --checkpoint DIR, or --baseline --config C")
    from latentwire.monitor import quiet_known_warnings

    quiet_known_warnings()

    from latentwire import config as config_lib
    from latentwire.data import load_splits
    from latentwire.checkpoint import default_device, load_checkpoint_model
    from latentwire.eval import evaluate, format_table, write_outputs
    from latentwire.features import active as active_features

    from latentwire.intervals import add_intervals, interval_table

    device = default_device()  # this process's GPU when there is one, else the CPU
    try:
        if args.baseline:
            cfg, model = baseline_model(args.config, args.set)
            model.to(device)
        else:
            cfg, model = load_checkpoint_model(args.checkpoint, args.set, device=device)
    except config_lib.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    splits = load_splits(cfg.data)
    examples = getattr(splits, args.split)
    if args.baseline:
        from latentwire.eval import eval_paths, is_text_side

        paths = [p for p in eval_paths(cfg.eval) if is_text_side(p)]
        result, rows = evaluate(model, examples, features=[], paths=paths, split=args.split,
                                latency=not args.no_latency, train_examples=splits.train)
    else:
        result, rows = evaluate(model, examples, features=active_features(cfg), split=args.split,
                                latency=not args.no_latency, train_examples=splits.train)
    result["device"] = device.type  # where every path ran, so what the (synchronized) latencies measure
    add_intervals(result, rows)
    print(interval_table(result) + "\n")
    curves = args.metrics_jsonl or (default_metrics_jsonl(args.checkpoint) if args.checkpoint else None)
    out = write_outputs(result, rows, args.output_dir, curves, plots=not args.no_plots)
    print(format_table(result))
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
