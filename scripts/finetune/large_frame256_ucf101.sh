#!/usr/bin/env bash
# Large-half model, 256 px, on UCF101 (docs/reference.md §6.5: lr 5e-5, batch 128, --bs-per-gpu 2, evaluated at
# the end).
# The paper's final T=10: add --different-shape --clip-len 10 (positional tables interpolated).
# Usage: SPLIT=1 bash scripts/finetune/large_frame256_ucf101.sh 0,...,7 [extra flags]; LOAD: the stage-2 export
# (default: that of scripts/pretrain/large_frame256cont.sh's default OUTPUT).
source "$(dirname "$0")/../_launch.sh"
GPUS=${1:-}
shift || true
launch vimpac.finetune "$GPUS" --deepspeed_config ds_configs/finetune_large.json \
  --frame-rate 2 --lr 5e-5 --beta1 0.9 --beta2 0.999 --weight-decay 0.01 --clip-grad-norm 1.0 \
  --lr-scheduler linear --warm-up 0.1 --dropout 0.1 --last-dropout 0.0 --batch-size 128 --num-workers 2 --tqdm \
  --num-test-clips 1 --last-test-clips 2,5,10 --eval-per-epochs 1000 --epochs 50 --dataset-name ucf101 --split-id "${SPLIT:-1}" \
  --load "${LOAD:-snap/pretrain/large_frame256/export}" --bs-per-gpu 2 \
  --data "${DATA:-data/codes/ucf101_f256}" --eval-data "${EVAL_DATA:-${DATA:-data/codes/ucf101_f256}}" \
  --output "${OUTPUT:-snap/finetune/large_frame256_ucf101_split${SPLIT:-1}}" \
  "$@"
