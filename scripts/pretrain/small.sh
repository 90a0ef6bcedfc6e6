#!/usr/bin/env bash
# Small analysis model (paper Table 3/6: 6 layers × 512, T=5, 128 px, 10 epochs, lr 1e-3, 10% warm-up,
# batch 1024 videos, 2-layer 2048 projection head). Usage: bash scripts/pretrain/small.sh 0,1,2,3 [extra flags]
# DATA: a 2-fps, 128 px code database (vimpac tokenize); OUTPUT: the run directory.
source "$(dirname "$0")/../_launch.sh"
GPUS=${1:-}
shift || true
launch vimpac.pretrain "$GPUS" --deepspeed_config ds_configs/small.json \
  --data "${DATA:-data/codes/howto100m_f128}" --output "${OUTPUT:-snap/pretrain/small}" \
  --model "efflayoutT,H|W" --pos-emb hw_separation --layers 6 --hid-dim 512 \
  --frame-size 128 --clip-len 5 --mask-blocks 5 \
  --mlm-weight 1.0 --nce-weight 1.0 --nce-proj-layers 2 --nce-proj-hid-dim 2048 \
  --lr 1e-3 --beta1 0.9 --beta2 0.98 --lr-scheduler linear --warm-up 0.1 \
  --bs-per-gpu 8 --batch-size 1024 --epochs 10 --num-workers 2 --tqdm --resume \
  "$@"
