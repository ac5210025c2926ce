#!/usr/bin/env bash
# Toy-world benchmark on CPU: `bash launch/toy_benchmark.sh [--set key=value ...]`.
# Writes the toy data (deterministic), trains LatentWire against the two committed frozen toy receivers
# (latentwire/assets/toy/{llama,qwen2}, made by launch/pretrain_toy.py) through the normal launch/train.py path,
# keeps the checkpoint with the best VALIDATION latent first-token accuracy (checkpoints/best; validation people
# are never trained on), rebuilds the model from that checkpoint alone, evaluates it once on the TEST split (people
# in neither training nor validation) and writes runs/toy/report.json, runs/toy/report.md and
# runs/toy/diagnostics.png. See docs/toy.md.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
OUT="${OUT:-runs/toy}"            # <-- results land here
CONFIG="${CONFIG:-configs/toy.json}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
rm -rf "$OUT/run" "$OUT/eval"
now() { date +%s; }
if [ ! -f latentwire/assets/toy/llama/config.json ] || [ ! -f latentwire/assets/toy/qwen2/config.json ]; then
    echo "== toy receivers missing: pretraining them (launch/pretrain_toy.py)"
    # one thread each, as recorded in the committed receivers' toy_receiver.json: the same bytes come back
    python launch/pretrain_toy.py --out latentwire/assets/toy --only llama --threads 1
    python launch/pretrain_toy.py --out latentwire/assets/toy --only qwen2 --threads 1
fi

t0=$(now)
echo "== toy data -> $OUT/data"
python -m latentwire.toy --out "$OUT/data"
# curriculum.data_stages.0: two facts per context (training and validation people as above), until validation
python -m latentwire.toy --out "$OUT/data2" --facts 2 --eval_facts 2 --n_test 0
t1=$(now)
echo "== training LatentWire ($CONFIG) -> $OUT/run"
python launch/train.py --config "$CONFIG" --output_dir "$OUT/run" --set eval.at_end=false \
    --set "data.train_files=[\"$OUT/data/train.json\"]" --set "data.val_files=[\"$OUT/data/val.json\"]" \
    --set "data.eval_files=[\"$OUT/data/test.json\"]" \
    --set "curriculum.data_stages.0.train_files=[\"$OUT/data2/train.json\"]" \
    --set "curriculum.data_stages.0.val_files=[\"$OUT/data2/val.json\"]" \
    --set eval.every=100 --set eval.periodic_examples=256 \
    --set eval.best_metric=latent_first_tok_top1_mean "$@"
t2=$(now)
echo "== evaluating $OUT/run/checkpoints/best (chosen on validation) on the test split"
python launch/eval.py --checkpoint "$OUT/run/checkpoints/best" --output_dir "$OUT/eval"
t3=$(now)
printf '{"data": %d, "train": %d, "eval": %d}\n' $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) > "$OUT/timings.json"
python launch/toy_report.py --eval "$OUT/eval/metrics.json" --metrics "$OUT/run/metrics.jsonl" --out "$OUT" \
    --timings "$OUT/timings.json"
echo "== report: $OUT/report.json, $OUT/report.md, $OUT/diagnostics.png"
