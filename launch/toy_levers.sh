#!/usr/bin/env bash
# Each learning-speed lever of the toy benchmark alone and in combination: `bash launch/toy_levers.sh`.
# Runs `launch/toy_benchmark.sh` (configs/toy.json: FSQ wire, 1,200 steps, validation every 100) once per row below,
# each in its own directory under runs/toy_levers/, and writes runs/toy_levers/levers.md: per lever, the first
# step (and seconds of training) at which VALIDATION latent EM reached 80 for both receivers on the run's own 8-fact
# validation data, then the TEST latent EM of the validation-best checkpoint. About 2.5 minutes per row on 2 cores.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
ROOT="${ROOT:-runs/toy_levers}"   # <-- results land here
mkdir -p "$ROOT"
NO_STAGE='curriculum.data_stages=[]'
declare -A LEVERS=(
  [none]="encoder.match_ngrams=[] encoder.local_mix=0 $NO_STAGE"
  [data_stage]="encoder.match_ngrams=[] encoder.local_mix=0"
  [local_mix]="encoder.match_ngrams=[] $NO_STAGE"
  [match]="encoder.local_mix=0 $NO_STAGE"
  [match+local_mix]="$NO_STAGE"
  [match+data_stage]="encoder.local_mix=0"
  [all]=""
)
ORDER=(none data_stage local_mix match match+local_mix match+data_stage all)
for name in "${ORDER[@]}"; do
  [ -f "$ROOT/$name/report.json" ] && { echo "== $name: done, kept"; continue; }
  sets=()
  for kv in ${LEVERS[$name]}; do sets+=(--set "$kv"); done
  echo "== $name: ${LEVERS[$name]:-configs/toy.json as is}"
  OUT="$ROOT/$name" bash launch/toy_benchmark.sh "${sets[@]}" > "$ROOT/$name.log" 2>&1
done
python - "$ROOT" "${ORDER[@]}" <<'PY'
import json, sys
root, names = sys.argv[1], sys.argv[2:]
lines = ["| lever | validation EM >= 80 at (step, s of training) | test latent EM llama / qwen | wall-clock s |",
         "|---|---|---|---:|"]
for name in names:
    r = json.load(open(f"{root}/{name}/report.json"))
    hit = r["validation_em_80"]
    at = f"step {hit['step']}, {hit['train_s']:.0f} s" if hit else f"not reached in {r['train_steps']} steps"
    ems = " / ".join(f"{v['latent_em']:.1f}" for v in r["receivers"].values())
    lines.append(f"| {name} | {at} | {ems} | {sum(r['timings_s'].values()):.0f} |")
open(f"{root}/levers.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
