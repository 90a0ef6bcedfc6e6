#!/usr/bin/env bash
# Small model on HMDB51 split ${SPLIT:-1} (docs/reference.md §6.5: 50 epochs, lr 1e-4, batch 128; average splits 1-3).
# Usage: SPLIT=1 bash scripts/finetune/small_hmdb51.sh 0,1,2,3 [extra flags]; DATA/EVAL_DATA: code databases, LOAD: export dir.
source "$(dirname "$0")/../_launch.sh"
GPUS=${1:-}
shift || true
launch vimpac.finetune "$GPUS" --deepspeed_config ds_configs/finetune_small.json \
  --load "${LOAD:-snap/pretrain/small/export}" --frame-rate 2 \
  --lr 1e-4 --beta1 0.9 --beta2 0.999 --weight-decay 0.01 --clip-grad-norm 1.0 --lr-scheduler linear --warm-up 0.1 \
  --dropout 0.1 --last-dropout 0.0 --bs-per-gpu 4 --batch-size 128 --num-workers 2 --tqdm \
  --num-test-clips 1 --last-test-clips 2,5,10 \
  --data "${DATA:-data/codes/hmdb51_f128}" --eval-data "${EVAL_DATA:-${DATA:-data/codes/hmdb51_f128}}" --dataset-name hmdb51 --split-id "${SPLIT:-1}" \
  --output "${OUTPUT:-snap/finetune/small_hmdb51_split${SPLIT:-1}}" --epochs 50 --eval-per-epochs 5 \
  "$@"
