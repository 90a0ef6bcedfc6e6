#!/usr/bin/env bash
# Large-half model, stage 2: epochs 91-100 at 256 px (32×32 codes, 6 mask blocks, 1 video per GPU), continuing
# stage 1's learning-rate schedule (docs/reference.md §5.7) in a run directory of its own. The original script
# called a non-existent entry point (docs/reference.md §8.1); this one calls vimpac.pretrain.
# The first launch finds no checkpoint in $OUTPUT and starts from the newest one of stage 1's run directory
# ($STAGE1, large.sh's OUTPUT), which it only reads (--resume-from): the height and width positional tables are
# interpolated 16 → 32 with their Adam moments, the optimizer step, LR-scheduler position and loss scale are kept,
# and training starts at the next epoch boundary (epoch 91) on the 256 px database, writing checkpoints and the
# export to $OUTPUT; stage 1's checkpoints and 128 px export stay as they were. With the same videos and
# --epochs 100 the schedule's total step count is unchanged, so the learning rate continues where stage 1 left it.
# Later launches (after an interruption) resume $OUTPUT's own 256 px checkpoints (--resume).
# Fine-tune the result with scripts/finetune/large_frame256_ucf101.sh (its LOAD default is this OUTPUT's export).
# Usage: bash scripts/pretrain/large_frame256cont.sh 0,1,2,3,4,5,6,7 [extra flags]
source "$(dirname "$0")/../_launch.sh"
GPUS=${1:-}
shift || true
launch vimpac.pretrain "$GPUS" --deepspeed_config ds_configs/large_frame256.json \
  --data "${DATA:-data/codes/howto100m_f256}" --output "${OUTPUT:-snap/pretrain/large_frame256}" \
  --resume-from "${STAGE1:-snap/pretrain/large}" \
  --model "efflayoutT,H|W" --pos-emb hw_separation --layers 24 --hid-dim 1024 --halve-att --halve-mlp \
  --frame-size 256 --clip-len 5 --mask-blocks 6 \
  --mlm-weight 1.0 --nce-weight 1.0 --nce-proj-layers 3 --nce-proj-hid-dim 4096 \
  --lr 3e-4 --beta1 0.9 --beta2 0.98 --lr-scheduler linear --warm-up 0.05 \
  --bs-per-gpu 1 --batch-size 1024 --epochs 100 --interval 10 --num-workers 2 --tqdm --resume \
  "$@"
