#!/usr/bin/env bash
# Large-half model, 128 px, on UCF101 (docs/reference.md §6.5: lr 5e-5, batch 128, 50 epochs, evaluated at the end).
# Usage: SPLIT=1 bash scripts/finetune/large_frame128_ucf101.sh 0,...,7 [extra flags]; LOAD: the stage-1 export
# (default: that of scripts/pretrain/large.sh's default OUTPUT, which stage 2 leaves as it was).
source "$(dirname "$0")/../_launch.sh"
GPUS=${1:-}
shift || true
launch vimpac.finetune "$GPUS" --deepspeed_config ds_configs/finetune_large.json \
  --frame-rate 2 --lr 5e-5 --beta1 0.9 --beta2 0.999 --weight-decay 0.01 --clip-grad-norm 1.0 \
  --lr-scheduler linear --warm-up 0.1 --dropout 0.1 --last-dropout 0.0 --batch-size 128 --num-workers 2 --tqdm \
  --num-test-clips 1 --last-test-clips 2,5,10 --eval-per-epochs 1000 --epochs 50 --dataset-name ucf101 --split-id "${SPLIT:-1}" \
  --load "${LOAD:-snap/pretrain/large/export}" --bs-per-gpu 4 \
  --data "${DATA:-data/codes/ucf101_f128}" --eval-data "${EVAL_DATA:-${DATA:-data/codes/ucf101_f128}}" \
  --output "${OUTPUT:-snap/finetune/large_frame128_ucf101_split${SPLIT:-1}}" \
  "$@"
