#!/usr/bin/env bash
# LatentWire with two small REAL frozen receivers on real SQuAD, on CPU (issue 15, item 5):
#
#     bash launch/small_real.sh [OUT]          # OUT defaults to runs/small_real
#
# SmolLM2-135M-Instruct ("llama", Llama architecture) + Qwen2.5-Coder-0.5B-Instruct ("qwen"), both quantized
# instruct models dequantized to float32 (docs/receivers.md), read through their chat templates
# (configs/small_real.json). Test = 104 fixed questions from the LAST 8 articles of SQuAD dev-v1.1; train and
# validation (cut by article) from the other 40. The steps:
#   1. fetch + convert the two receivers into the hub cache (network once; 147 s and 4 GB peak from empty)
#   2. cut dev-v1.1.json by article into runs/squad_dev/{train,test}.json (+ manifest.json with the id hashes)
#   3. the reference: text-side paths without a checkpoint (text, token_budget, byte_budget, closed_book)
#   4. train on 2 CPU ranks (ZeRO-3): CE only (losses.kd_weight=0), because the text teacher's forward over a
#      ~250-token chat prompt would dominate every step; see "KD" below to pay it once through a cache instead
#   5. evaluate the trained checkpoint on the same test questions (all paths, 95% intervals)
# Budget: written for ~90 minutes of training on 2 cores (train.max_steps in the config); NOT RUN YET.
set -euo pipefail

# ---- environment ------------------------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
source launch/venv.sh
export PYTHONUNBUFFERED=1
OUT=${1:-runs/small_real}
SQUAD=${SQUAD:-../shared/data/squad/dev-v1.1.json}   # <-- set this: the official SQuAD v1.1 dev file
THREADS=${THREADS:-1}                                 # torch threads per rank (2 ranks on a 2-core machine)
export OMP_NUM_THREADS=$THREADS

# ---- 1. receivers ------------------------------------------------------------------------------------------------
python -m latentwire.hub fetch real:smollm2-135m real:qwen2.5-0.5b

# ---- 2. data ----------------------------------------------------------------------------------------------------
python launch/squad_articles.py "$SQUAD" --out runs/squad_dev --test_articles 8 --test_per_article 13

# ---- 3. the reference without a checkpoint -------------------------------------------------------------------------
if [ ! -f "$OUT/baseline/metrics.json" ]; then
    python launch/eval.py --baseline --config configs/small_real.json --output_dir "$OUT/baseline" --no_plots
fi

# ---- 4. training (resumes from $OUT/train/checkpoints/latest when rerun) --------------------------------------------
# KD without paying the text teacher every step: write each receiver's own top-k logits on the training questions
# once (python launch/cache_teacher.py --config configs/small_real.json --teacher real:qwen2.5-0.5b --receiver qwen
# --out $OUT/cache_qwen; the same for llama), add {"path": <the receiver's path>, "cache": <that dir>} to the
# receiver's `teachers`, and set losses.kd_weight > 0 with losses.text_teacher_weight=0 (which skips the live text
# pass: latentwire/teachers.py kd_targets). Not tried yet.
deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config configs/small_real.json \
    --output_dir "$OUT/train" --set eval.at_end=false

# ---- 5. the trained latent on the test questions ------------------------------------------------------------------
python launch/eval.py --checkpoint "$OUT/train/checkpoints/latest" --output_dir "$OUT/eval"
echo "reference: $OUT/baseline/report.md   trained: $OUT/eval/report.md"
