#!/usr/bin/env bash
# LatentWire with two small REAL frozen receivers on real SQuAD, on CPU (issue 15, item 5):
#
#     bash launch/small_real.sh [OUT [--set key=value ...]]   # OUT defaults to runs/small_real; ~75 min, 2 cores
#
# SmolLM2-135M-Instruct ("llama", Llama architecture) + Qwen2.5-Coder-0.5B-Instruct ("qwen"), both quantized
# instruct models dequantized to float32 (docs/receivers.md), read through their chat templates
# (configs/small_real.json). Test = 104 fixed questions from the LAST 8 articles of SQuAD dev-v1.1; train and
# validation (cut by article) from the other 40. The wire is FSQ codes: 32 shared slots x 30 bits + 2 private
# slots x 15 bits per receiver. The steps:
#   1. fetch + convert the two receivers into the hub cache (network once; 147 s and 4 GB peak from empty)
#   2. cut dev-v1.1.json by article into runs/squad_dev/{train,test}.json (+ manifest.json with the id hashes)
#   3. train on 2 CPU ranks (ZeRO-2: the frozen receivers are replicated, only the encoder and adapters are
#      sharded), CE only (losses.kd_weight=0): the text teacher's forward over a ~250-token chat prompt would
#      cost more than the whole latent step. Validation (32 questions of the validation articles) every 50
#      steps picks checkpoints/best by the Qwen latent NLL.
#   4. evaluate checkpoints/best ONCE on the test questions: every path (text, latent, token_budget, byte_budget,
#      closed_book) per receiver, with 95% intervals; no latency timing (--no_latency: it would decode every
#      path twice). The text-side paths do not depend on the checkpoint; `BASELINE=1` also writes them alone
#      first (python launch/eval.py --baseline --config configs/small_real.json, ~20 min).
# Budget: train.max_steps in the config (300 steps x 4 examples x 2 ranks) is sized for ~45 min of training.
set -euo pipefail

# ---- environment ------------------------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
source launch/venv.sh
export PYTHONUNBUFFERED=1
OUT=${1:-runs/small_real}
shift $(( $# > 0 ? 1 : 0 ))                           # the rest: --set key=value overrides for training
SQUAD=${SQUAD:-../shared/data/squad/dev-v1.1.json}   # <-- set this: the official SQuAD v1.1 dev file
THREADS=${THREADS:-1}                                 # torch threads per training rank (2 ranks on 2 cores)
EVAL_THREADS=${EVAL_THREADS:-2}                       # torch threads of the single evaluation process

# ---- 1. receivers ------------------------------------------------------------------------------------------------
python -m latentwire.hub fetch real:smollm2-135m real:qwen2.5-0.5b

# ---- 2. data ----------------------------------------------------------------------------------------------------
python launch/squad_articles.py "$SQUAD" --out runs/squad_dev --test_articles 8 --test_per_article 13

# ---- the reference without a checkpoint (optional: step 4 evaluates the same text-side paths) -----------------------
if [ "${BASELINE:-0}" = 1 ] && [ ! -f "$OUT/baseline/metrics.json" ]; then
    OMP_NUM_THREADS=$EVAL_THREADS python launch/eval.py --baseline --config configs/small_real.json \
        --output_dir "$OUT/baseline" --no_plots --no_latency
fi

# ---- 3. training (resumes from $OUT/train/checkpoints/latest when rerun) --------------------------------------------
# KD without paying the text teacher every step: write each receiver's own top-k logits on the training questions
# once (python launch/cache_teacher.py --config configs/small_real.json --teacher real:qwen2.5-0.5b --receiver qwen
# --out $OUT/cache_qwen; the same for llama), add {"path": <the receiver's path>, "cache": <that dir>} to the
# receiver's `teachers`, and set losses.kd_weight > 0 with losses.text_teacher_weight=0 (which skips the live text
# pass: latentwire/teachers.py kd_targets). Not tried: at ~1 s per question and receiver it costs as much as training.
t0=$(date +%s)
OMP_NUM_THREADS=$THREADS deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json \
    --config configs/small_real.json --output_dir "$OUT/train" --set eval.at_end=false "$@"
t1=$(date +%s)

# ---- 4. the validation-chosen checkpoint on the test questions ------------------------------------------------------
OMP_NUM_THREADS=$EVAL_THREADS python launch/eval.py --checkpoint "$OUT/train/checkpoints/best" \
    --output_dir "$OUT/eval" --no_latency
t2=$(date +%s)
printf '{"train_s": %d, "eval_s": %d}\n' $((t1 - t0)) $((t2 - t1)) > "$OUT/timings.json"
echo "trained, on the test questions: $OUT/eval/report.md (learning curves: $OUT/eval/training_curves.png)"
