#!/usr/bin/env bash
# Rebuild and score the bundled tiny LISA (assets/tiny-lisa). Every number in its model card
# comes from these commands. CPU only; about an hour on 2 cores.
#   bash scripts/tiny_model.sh            # everything
#   STEP=score bash scripts/tiny_model.sh # only the scoring of the current bundle
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
STEP=${STEP:-all}

if [ "$STEP" = all ]; then
  # 1. Pretraining from scratch on synthetic scenes without hearts (the held-out concept):
  #    12 min CLIP patch labelling (kind, colour, size, row, column), 9 min SAM click +
  #    description prompts, then the LISA loop with both encoders frozen, the target loss and
  #    the pointing loss; 57 minutes in all (peak RSS 12.5 to 13.3 GiB: 8000 scenes, all
  #    decoded images kept in memory). Each scene also gets one query about another of its
  #    shapes (same image), so the image alone never tells the answer.
  python -m lisa_demo.train --preset tiny-random --train-all \
    --synthetic 8000 --image-store-size 8192 --synthetic-seed 1 --exclude-concept heart \
    --synthetic-explanations \
    --synthetic-extra-queries 1 --synthetic-extra-families attribute uniqueness function superlative \
    --queries random --vision-warmup-minutes 12 --sam-warmup-minutes 9 --vision-warmup-lr 3e-3 \
    --freeze-encoders --target-weight 1.0 --pointing-weight 2.0 --batch-size 8 \
    --learning-rate 3e-4 --warmup-steps 200 \
    --lr-scheduler cosine --max-steps 12000 --max-minutes 57 --schedule-by-time --eval-every 1000 \
    --max-val-samples 100 --dice-weight 1.0 --iou-weight 1.0 --log-every 50 \
    --seg-rate-samples 8 --export-model --seed 7 --output-dir runs/pretrain
  # 2. Bundle the best checkpoint (float16 safetensors).
  python -m lisa_demo.bundle --model runs/pretrain/model --run runs/pretrain --out assets/tiny-lisa
fi

# 3. Held-out scenes from seeds never used in training.
[ -d runs/heldout ] || python -m lisa_demo.data.synthetic --out runs/heldout --train 0 \
  --val 250 --seed 9001 --exclude-concept heart
[ -d runs/heart-eval ] || python -m lisa_demo.data.synthetic --out runs/heart-eval --train 0 \
  --val 100 --seed 4242 --focus-concept heart
# The heart queries that cannot be answered without knowing the word (a spatial query's target
# is the shape next to a named reference, whatever its kind).
[ -d runs/heart-word-eval ] || python -m lisa_demo.data.synthetic --out runs/heart-word-eval \
  --train 0 --val 100 --seed 4343 --focus-concept heart --families attribute superlative uniqueness
# The same kind of queries, 300 of them from another seed: a closer estimate of the same score.
[ -d runs/heart-word-eval300 ] || python -m lisa_demo.data.synthetic --out runs/heart-word-eval300 \
  --train 0 --val 300 --seed 4444 --focus-concept heart --families attribute superlative uniqueness

# 4. LISA protocol (first query per image, teacher-forced "[SEG].") and the [SEG] rate.
python -m lisa_demo.eval --dataset runs/heldout/val --model-only --preset tiny --seg-rate 250 \
  --per-sample runs/heldout-per-sample.json
python -m lisa_demo.eval --dataset runs/heart-eval/val --model-only --preset tiny \
  --per-sample runs/heart-before-per-sample.json
python -m lisa_demo.eval --dataset runs/heart-word-eval/val --model-only --preset tiny \
  --per-sample runs/heart-word-before-per-sample.json
python -m lisa_demo.eval --dataset runs/heart-word-eval300/val --model-only --preset tiny \
  --per-sample runs/heart-word300-before-per-sample.json

# 5. The Training tab's default run: LoRA fine-tune on scenes whose targets are hearts, mixed
#    with replay scenes of every concept (replay share 0.3, replay distillation weight 3, the
#    projection and mask decoder frozen; half the heart scenes also show a diamond), then what
#    it kept.
rm -rf runs/heart-finetune
#    The same command as the tab's (its scenes come from --synthetic-seed 0, the default).
python -m lisa_demo.train --preset tiny --synthetic 400 \
  --focus-concept heart --train-tokens heart --synthetic-explanations --look-alikes diamond \
  --max-steps 600 --batch-size 8 --learning-rate 1.5e-3 --replay-share 0.3 --lora-r 16 \
  --lora-targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
  --lr-scheduler cosine --eval-every 300 --max-val-samples 40 --output-dir runs/heart-finetune
python -m lisa_demo.eval --dataset runs/heldout/val --preset tiny \
  --checkpoint runs/heart-finetune/checkpoints/best
python scripts/score_examples.py --checkpoint runs/heart-finetune/checkpoints/best
python -m lisa_demo.eval --dataset runs/heart-eval/val --preset tiny \
  --checkpoint runs/heart-finetune/checkpoints/best --per-sample runs/heart-after-per-sample.json
python -m lisa_demo.eval --dataset runs/heart-word-eval/val --preset tiny \
  --checkpoint runs/heart-finetune/checkpoints/best --per-sample runs/heart-word-after-per-sample.json
python -m lisa_demo.eval --dataset runs/heart-word-eval300/val --preset tiny \
  --checkpoint runs/heart-finetune/checkpoints/best
