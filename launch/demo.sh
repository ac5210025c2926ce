#!/usr/bin/env bash
# LatentWire demo on the embedded SQuAD sample: `bash launch/demo.sh`.
# Sets up .venv, builds the tiny Llama / Qwen2 receivers, trains on 2 CPU ranks with ZeRO-3 (frozen receivers
# partitioned) into runs/demo, rebuilds the model from the checkpoint alone, evaluates it and prints the table.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
OUT="${OUT:-runs/demo}"
rm -rf "$OUT"
echo "== building tiny receivers (runs/receivers)"
python -m latentwire.tiny --out runs/receivers
echo "== training: 2 ranks, ZeRO-3"
deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config configs/tiny.json \
    --output_dir "$OUT" --set eval.at_end=false "$@"
echo "== evaluating $OUT/checkpoints/latest"
python launch/eval.py --checkpoint "$OUT/checkpoints/latest" --output_dir "$OUT/eval"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
info = json.load(open(f"{out}/run_info.json"))
share = [f"{b / info['frozen_bytes_total']:.0%}" for b in info["frozen_bytes_per_rank"]]
print(f"\nrun: world {info['world_size']}, ZeRO-{info['zero_stage']}, frozen bytes per rank {share} of "
      f"{info['frozen_bytes_total'] / 1e6:.2f} MB; metrics in {out}/eval/metrics.json")
PY
