#!/usr/bin/env bash
# The GPU check: ONE prepared command for the first task lent a GPU (H100 80 GB or H200 141 GB); about 7 of the
# 8 minutes of device time it may take, set-up included. Results come back under $OUT; nothing else is needed there.
#
#   bash launch/gpu_check.sh --prepare     # here (CPU): ../shared/wheels/gpu/*.whl and the real Llama-3.1 /
#                                          #   Qwen2.5 tokenizers (if cached by `python -m latentwire.hub fetch
#                                          #   tiny:llama3 tiny:qwen2.5`) into .whl/ (git-ignored, ~40 MiB)
#   run(command="bash launch/gpu_check.sh", carry=[".whl"], timeout_s=480)      # the device call
#   bash launch/gpu_check.sh --merge DIR   # here: DIR (the returned $OUT) -> kernels/results/<gpu>.csv and
#                                          #   launch/results/bench_step.csv, prints the README tables
#   bash launch/gpu_check.sh --dry         # here (CPU): every step a CPU can check (tests/test_gpu_ready.py)
#
# Stages (launch/gpu_check.py), each under its own time limit; OUT/summary.json is rewritten as each one ends, so
# a stage cut by the device's limit never loses the ones before it. OUT: summary.json, gpu_check.log, env.txt,
# kernels.csv, train.csv (5 files, one level).
#   setup    the wheels the image lacks into /tmp/site (../shared/GPU.md), imports, nvidia-smi       -> env.txt
#   tests    pytest -m gpu: every kernel in bf16 against float64 at the real heads' shapes, the Triton
#            cases compiled on CUDA, evaluation on the GPU                                           -> gpu_check.log
#   kernels  python -m kernels.bench --compass: the targets' shapes against torch eager, torch.compile,
#            F.linear_cross_entropy, Liger, cut-cross-entropy; a peer that cannot run: "not measured"  -> kernels.csv
#   train    python -m launch.bench_step --preset real: Llama-3.1-8B + Qwen2.5-7B architectures with random bf16
#            weights on the GPU, LatentWire's step vs a bare loop: steps/s, tokens/s, peak memory against
#            the planner's estimate                                                                  -> train.csv
# --dry runs the same stages on a CPU: the imports, the gpu tests' collection, the benchmark harness at toy
# shapes, the real models on the meta device with the planner's estimate, a one-step tiny training benchmark, and
# --merge on the rows it wrote (into a temporary directory). `bash -n` checks this script first.

set -euo pipefail
cd "$(dirname "$0")/.."

MODE=run
case "${1:-}" in
    --dry) MODE=dry ;;
    --prepare) MODE=prepare ;;
    --merge) MODE=merge; MERGE_DIR="${2:?--merge DIR}" ;;
    "") ;;
    *) echo "usage: bash launch/gpu_check.sh [--dry | --prepare | --merge DIR]" >&2; exit 2 ;;
esac

# ---- environment ---------------------------------------------------------------------------------------------
if [ "$MODE" = run ]; then
    PYTHON="${PYTHON:-python3}"                      # the image's interpreter
    OUT="${OUT:?the device call sets OUT}"
    SITE="${SITE:-/tmp/site}"                        # <-- where the missing wheels go (never the image's own)
else
    PYTHON="${PYTHON:-$PWD/.venv/bin/python}"        # the repository's venv (tests/run.sh creates it)
    OUT="${OUT:-$(mktemp -d)}"
fi
export PYTHONUNBUFFERED=1

case "$MODE" in
    prepare) exec "$PYTHON" launch/gpu_check.py prepare ;;
    merge) exec "$PYTHON" launch/gpu_check.py merge "$MERGE_DIR" ;;
esac

bash -n "$0"                                          # this script parses
mkdir -p "$OUT"

# ---- set-up: install what the image lacks ---------------------------------------------------------------------
WHEELS=.whl
if [ "$MODE" = dry ]; then
    # The CPU venv already has these packages (and Python 3.11 cannot install the cp312 wheels): check the set.
    [ -n "$(ls "$WHEELS"/*.whl 2>/dev/null)" ] || WHEELS=../shared/wheels/gpu
    if [ -n "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
        "$PYTHON" launch/gpu_check.py wheels "$WHEELS" > /dev/null
    else
        echo "no GPU wheels here (.whl/ or ../shared/wheels/gpu): skipping the install check"
    fi
else
    started=$(date +%s)
    if [ -n "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
        "$PYTHON" launch/gpu_check.py wheels "$WHEELS" > /dev/null
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
        export PYTHONPATH="$SITE:$PWD"
    else
        echo "no .whl/ carried: deepspeed and the kernel peers are missing (run --prepare, carry .whl)" >&2
        export PYTHONPATH="$PWD"
    fi
    echo "installed in $(( $(date +%s) - started )) s"
fi

# ---- the stages ----------------------------------------------------------------------------------------------
BUDGET="${BUDGET:-420}"                               # <-- seconds for the stages (the device call allows 480)
if [ "$MODE" = dry ]; then
    exec "$PYTHON" launch/gpu_check.py run --out "$OUT" --dry --budget "$BUDGET" --python "$PYTHON"
fi
exec "$PYTHON" launch/gpu_check.py run --out "$OUT" --budget "$BUDGET" --python "$PYTHON"
