#!/usr/bin/env bash
# LatentWire demo: `bash launch/demo.sh` (a few minutes on 2 CPU cores once .venv exists).
# Sets up .venv, writes a small toy world (one fact per context: "Context: Gus Vale fig.\nQuestion: What does Gus
# Vale have?", the value drawn per example, so nothing but the context tells it), trains one shared latent for the
# two committed frozen toy receivers (a Llama and a Qwen2 that learned to read this world, latentwire/assets/toy)
# through the real launcher on 2 CPU ranks with ZeRO-3, keeps the checkpoint that does best on VALIDATION, rebuilds
# the model from that checkpoint alone and evaluates it once on the TEST split (people never seen in training or
# validation). Prints what each receiver answers from the latent against what it answers from the text, from the
# text cut to the latent's token budget (question kept) and from the question alone, with the wire's bytes: the
# slots travel as learned discrete codes (FSQ, a few bits per slot, wire format v2).
# Results: runs/demo/eval (metrics.json, report.md, em_vs_bytes.png, training_curves.png); curves:
# `tensorboard --logdir runs/demo`.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
OUT="${OUT:-runs/demo}"           # <-- results land here
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread per rank: 2 ranks on 2 cores
rm -rf "$OUT"
t0=$(date +%s)
echo "== toy data (1 fact per context) -> $OUT/data"
python -m latentwire.toy --out "$OUT/data" --facts 1 --eval_facts 1 --n_train 8000 --n_val 128 --n_test 256 >/dev/null
echo "== training: 2 ranks, ZeRO-3 (frozen receivers partitioned), validation every 200 steps"
deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config configs/demo.json \
    --output_dir "$OUT" --set eval.at_end=false \
    --set "data.train_files=[\"$OUT/data/train.json\"]" --set "data.val_files=[\"$OUT/data/val.json\"]" \
    --set "data.eval_files=[\"$OUT/data/test.json\"]" "$@" 2>&1 | grep --line-buffered -v "^\[20\|^\[rank" || true
test -e "$OUT/checkpoints/best" || { echo "training did not finish: no $OUT/checkpoints/best" >&2; exit 1; }
echo "== evaluating $OUT/checkpoints/best (chosen on validation) on the test split"
python launch/eval.py --checkpoint "$OUT/checkpoints/best" --output_dir "$OUT/eval" >/dev/null
python - "$OUT" "$t0" <<'PY'
import json, sys, time
out, t0 = sys.argv[1], int(sys.argv[2])
m = json.load(open(f"{out}/eval/metrics.json"))
info = json.load(open(f"{out}/run_info.json"))
w = m["wire"]
print(f"\n{m['n_examples']} {m['split']} examples, EM % (what each receiver reads):\n")
print("| receiver | latent (the wire) | text (full prompt) | token budget | closed book |")
print("|---|---:|---:|---:|---:|")
for name in m["receivers"]:
    r = m[name]
    print(f"| {name} | {r['latent']['em']:.1f} | {r['text']['em']:.1f} | {r['token_budget']['em']:.1f} "
          f"| {r['closed_book']['em']:.1f} |")
comp = w["compression"][m["receivers"][0]]
prec = m["wire_precision"]
print(f"\nwire: {w['latent_slots']} slots, {w['latent_bytes'][prec]:.0f} B per example as {prec} (FSQ codes, header "
      f"included) against the prompt's {w['text_bytes_utf8']:.0f} B UTF-8 / {w['text_bytes_zstd']:.0f} B zstd: "
      f"{comp['bytes_utf8'][prec]:.1f}x fewer bytes than UTF-8, tokens_sent {comp['tokens_sent']:.2f}x (prompt tokens "
      "per slot on the wire)")
share = [f"{b / info['frozen_bytes_total']:.0%}" for b in info["frozen_bytes_per_rank"]]
print(f"run: {info['world_size']} ranks, ZeRO-{info['zero_stage']}, frozen bytes per rank {share}; "
      f"{time.time() - t0:.0f} s in all")
print(f"report: {out}/eval/report.md, plots: {out}/eval/*.png, curves: tensorboard --logdir {out}")
PY
