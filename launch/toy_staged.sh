#!/usr/bin/env bash
# Toy world, staged: `bash launch/toy_staged.sh` (~35 min on 2 CPU cores).
# The same model and config as launch/toy_benchmark.sh (configs/toy.json), trained with a curriculum over the
# number of facts by resuming one run directory on new data: 2 facts up to step 8500, 3-4 facts up to 12500,
# 5-8 facts up to 16500 (the learning rate is constant after warm-up, so each resume continues exactly). Then
# evaluates on the benchmark's held-out set (512 examples, 8 facts, held-out people) and writes
# $OUT/report.json, report.md and diagnostics.png. See docs/toy.md.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
OUT="${OUT:-runs/toy_staged}"     # <-- results land here
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
rm -rf "$OUT/run" "$OUT/eval"
t0=$(date +%s)
python -m latentwire.toy --out "$OUT/data2" --facts 2 --eval_facts 2 --n_train 20000 --n_eval 256
python -m latentwire.toy --out "$OUT/data4" --facts 3-4 --eval_facts 4 --n_train 20000 --n_eval 256
python -m latentwire.toy --out "$OUT/data8" --facts 5-8 --eval_facts 8 --n_train 20000 --n_eval 256
python -m latentwire.toy --out "$OUT/data"  # the benchmark's data: its held-out set is what the report scores
for stage in "2 8500" "4 12500" "8 16500"; do
    set -- $stage
    echo "== stage: data$1 up to step $2"
    python launch/train.py --config configs/toy.json --output_dir "$OUT/run" --allow_config_change \
        --set "data.train_files=[\"$OUT/data$1/train.json\"]" --set "data.eval_files=[\"$OUT/data$1/eval.json\"]" \
        --set train.max_steps="$2" --set train.save_every=500 --set eval.at_end=false --set eval.every=500 \
        --set eval.at_start=true --set eval.periodic_examples=256 --set eval.best_metric=latent_first_tok_top1_mean
done
t1=$(date +%s)
python launch/eval.py --checkpoint "$OUT/run/checkpoints/latest" --output_dir "$OUT/eval" \
    --set "data.eval_files=[\"$OUT/data/eval.json\"]" --set eval.max_examples=512
t2=$(date +%s)
printf '{"train": %d, "eval": %d}\n' $((t1 - t0)) $((t2 - t1)) > "$OUT/timings.json"
python launch/toy_report.py --eval "$OUT/eval/metrics.json" --metrics "$OUT/run/metrics.jsonl" --out "$OUT" \
    --timings "$OUT/timings.json"
echo "== report: $OUT/report.json, $OUT/report.md, $OUT/diagnostics.png"
