#!/usr/bin/env bash
# Large-half model, stage 1 (paper: 24 layers × 1024, halved attention and MLP, T=5, 128 px, lr 3e-4, 5% warm-up,
# batch 1024, 3-layer 4096 projection head): epochs 1-90 of a 100-epoch schedule; stage 2 is
# large_frame256cont.sh. Usage: bash scripts/pretrain/large.sh 0,1,2,3,4,5,6,7 [extra flags]
source "$(dirname "$0")/../_launch.sh"
GPUS=${1:-}
shift || true
launch vimpac.pretrain "$GPUS" --deepspeed_config ds_configs/large.json \
  --data "${DATA:-data/codes/howto100m_f128}" --output "${OUTPUT:-snap/pretrain/large}" \
  --model "efflayoutT,H|W" --pos-emb hw_separation --layers 24 --hid-dim 1024 --halve-att --halve-mlp \
  --frame-size 128 --clip-len 5 --mask-blocks 5 \
  --mlm-weight 1.0 --nce-weight 1.0 --nce-proj-layers 3 --nce-proj-hid-dim 4096 \
  --lr 3e-4 --beta1 0.9 --beta2 0.98 --lr-scheduler linear --warm-up 0.05 \
  --bs-per-gpu 2 --batch-size 1024 --epochs 100 --stop-epoch 90 --num-workers 2 --tqdm --resume \
  "$@"
