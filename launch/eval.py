"""Evaluate a LatentWire checkpoint, rebuilt from the checkpoint directory alone.

    python launch/eval.py --checkpoint runs/demo/checkpoints/latest --output_dir runs/demo/eval2 \
        [--set eval.max_examples=8 ...]

Writes OUT/metrics.json (per receiver text / latent / token_budget: em, f1, nll, first_tok_top1/top5; wire;
latency; features), OUT/predictions.jsonl and prints the results table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/checkpoints/latest)")
    parser.add_argument("--output_dir", required=True, help="where metrics.json and predictions.jsonl go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)

    from latentwire import config as config_lib
    from latentwire.data import load_splits
    from latentwire.eval import evaluate, format_table, load_checkpoint_model
    from latentwire.train import active_features

    try:
        cfg, model = load_checkpoint_model(args.checkpoint, args.set)
    except config_lib.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    _, eval_examples = load_splits(cfg.data)
    result, rows = evaluate(model, eval_examples, features=active_features(cfg))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
