#!/usr/bin/env bash
# One row of the model card's comparison of fine-tune settings (assets/tiny-lisa/README.md,
# "Choosing the fine-tune's defaults"): the Training tab's heart run with the row's settings,
# then its three scores.
#
#   bash scripts/compare_finetunes.sh NAME [TRAINER FLAGS...]
#   bash scripts/compare_finetunes.sh g26 --max-steps 700 --eval-every 350 --replay-distill 3
#
# The base command pins every setting the comparison varied at the values the grid started
# from (LoRA r 16 on all seven projections, lr 7e-4, 420 steps, replay share 0.5, the mask side
# at the full rate, no distillation, projector frozen); the row's flags come after it and win.
# Writes runs/compare/NAME/ (the run), NAME.train.log, NAME.word300.json, NAME.heldout.json,
# NAME.examples.txt and one line in runs/compare/summary.txt:
#   - word300: the 300 heart queries that need the word (seed 4444), before 0.285;
#   - heldout: the 250 held-out scenes without hearts (seed 9001), before 0.808;
#   - examples: the IoU of each bundled example (assets/examples), 6 is the heart;
#   - wall: seconds from the trainer's start to its end (data, model, evaluations included).
# The two evaluation sets come from step 3 of scripts/tiny_model.sh (made here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
NAME=${1:?usage: compare_finetunes.sh NAME [TRAINER FLAGS...]}
shift
OUT=runs/compare
RUN=$OUT/$NAME
mkdir -p "$OUT"
rm -rf "$RUN"

[ -d runs/heldout ] || python -m lisa_demo.data.synthetic --out runs/heldout --train 0 \
  --val 250 --seed 9001 --exclude-concept heart
[ -d runs/heart-word-eval300 ] || python -m lisa_demo.data.synthetic \
  --out runs/heart-word-eval300 --train 0 --val 300 --seed 4444 --focus-concept heart \
  --families attribute superlative uniqueness

start=$(date +%s)
python -m lisa_demo.train --preset tiny --synthetic 400 --synthetic-seed 11 \
  --focus-concept heart --train-tokens heart --synthetic-explanations \
  --max-steps 420 --eval-every 210 --batch-size 8 --learning-rate 7e-4 --lora-r 16 \
  --lora-targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
  --lr-scheduler cosine --max-val-samples 40 --replay-share 0.5 --mask-lr-scale 1 \
  --replay-distill 0 --output-dir "$RUN" "$@" > "$RUN.train.log" 2>&1
wall=$(( $(date +%s) - start ))
echo "wall $wall s" >> "$RUN.train.log"

best=$RUN/checkpoints/best
python -m lisa_demo.eval --dataset runs/heart-word-eval300/val --preset tiny \
  --checkpoint "$best" --json > "$RUN.word300.json"
python -m lisa_demo.eval --dataset runs/heldout/val --preset tiny --checkpoint "$best" \
  --json > "$RUN.heldout.json"
python scripts/score_examples.py --checkpoint "$best" > "$RUN.examples.txt"
python - "$RUN" "$wall" "$*" >> "$OUT/summary.txt" <<'PY'
import json
import re
import sys

run, wall, flags = sys.argv[1:]
word = json.load(open(f"{run}.word300.json"))["giou"]
held = json.load(open(f"{run}.heldout.json"))["giou"]
ious = re.findall(r"IoU (\d\.\d{3})", open(f"{run}.examples.txt").read())
print(f"{run.split('/')[-1]}: word300 {word:.3f} heldout {held:.3f} wall {wall} s "
      f"examples {' '.join(ious)} | {flags}")
PY
tail -n 1 "$OUT/summary.txt"
