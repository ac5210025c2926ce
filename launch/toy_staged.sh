#!/usr/bin/env bash
# Toy world, staged: `bash launch/toy_staged.sh` (~20 min on 2 idle CPU cores).
# The same model and config as launch/toy_benchmark.sh (configs/toy.json), trained with a curriculum over the
# number of facts by resuming one run directory on new data: 2 facts, then 3-4, then 5-8. Each stage change is
# decided on VALIDATION: a stage ends when its own validation set (people never seen in training) reaches
# train.stop_at_metric on latent first-token accuracy, or at its step cap. The last stage keeps the checkpoint
# with the best 8-fact validation accuracy (checkpoints/best), and only that checkpoint is evaluated, once, on the
# TEST split (512 examples, 8 facts, people in neither training nor validation). Writes $OUT/report.json,
# report.md and diagnostics.png. See docs/toy.md.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
OUT="${OUT:-runs/toy_staged}"     # <-- results land here
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
rm -rf "$OUT/run" "$OUT/eval"
t0=$(date +%s)
python -m latentwire.toy --out "$OUT/data2" --facts 2 --eval_facts 2 --n_train 20000 --n_val 256 --n_test 0
python -m latentwire.toy --out "$OUT/data4" --facts 3-4 --eval_facts 4 --n_train 20000 --n_val 256 --n_test 0
python -m latentwire.toy --out "$OUT/data8" --facts 5-8 --eval_facts 8 --n_train 20000 --n_val 256 --n_test 0
python -m latentwire.toy --out "$OUT/data" --n_train 0  # the benchmark's test.json: the only file the report scores
# stage: data directory, validation accuracy that ends it (0: run to the cap), most steps it may add
step_of_latest() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" \
    "$OUT/run/checkpoints/latest/trainer_state.json" 2>/dev/null || echo 0; }
for stage in "2 85 10000" "4 80 4000" "8 0 4000"; do
    set -- $stage
    cap=$(( $(step_of_latest) + $3 ))
    echo "== stage: data$1 from step $(step_of_latest), until validation first-token accuracy >= $2 or step $cap"
    python launch/train.py --config configs/toy.json --output_dir "$OUT/run" --allow_config_change \
        --set "data.train_files=[\"$OUT/data$1/train.json\"]" --set "data.val_files=[\"$OUT/data$1/val.json\"]" \
        --set "data.eval_files=[\"$OUT/data/test.json\"]" \
        --set train.max_steps="$cap" --set train.save_every=500 --set eval.at_end=false --set eval.every=500 \
        --set eval.at_start=true --set eval.periodic_examples=256 --set eval.best_metric=latent_first_tok_top1_mean \
        --set train.stop_at_metric="$2"
done
t1=$(date +%s)
python launch/eval.py --checkpoint "$OUT/run/checkpoints/best" --output_dir "$OUT/eval" \
    --set "data.eval_files=[\"$OUT/data/test.json\"]" --set eval.max_examples=512
t2=$(date +%s)
printf '{"train": %d, "eval": %d}\n' $((t1 - t0)) $((t2 - t1)) > "$OUT/timings.json"
python launch/toy_report.py --eval "$OUT/eval/metrics.json" --metrics "$OUT/run/metrics.jsonl" --out "$OUT" \
    --timings "$OUT/timings.json"
echo "== report: $OUT/report.json, $OUT/report.md, $OUT/diagnostics.png"
