#!/usr/bin/env bash
# The device check on a GPU machine whose Python lacks deepspeed, lmdb and av: install their wheels from .whl/,
# then run the sections named on the command line (default: all), writing JSON and logs to $OUT:
#   tests       the GPU-marked tests (kernels at real sizes included)
#   kernels     scripts/bench/kernels.py: Triton vs eager and torch.compile'd references, same run
#   train_step  one small-model step at 128 px, fp16: reference vs Triton attention, eager and compiled
#   tokenize    the tokenization benchmarks (VQ-VAE, DALL-E fp16)
#   pretrain    a short fp16 pre-training run through the launcher script
# All sections take longer than one 600-s call; split them, e.g.
#   run(command="bash scripts/bench/gpu_check.sh tests kernels train_step", carry=[".whl"], timeout_s=560)
#   run(command="bash scripts/bench/gpu_check.sh tokenize pretrain", carry=[".whl"], timeout_s=400)
set -uo pipefail
OUT=${OUT:-/tmp/vimpac-gpu-check}
mkdir -p "$OUT"
SECTIONS=${*:-tests kernels train_step tokenize pretrain}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, av, lmdb, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'av', av.__version__, 'deepspeed', deepspeed.__version__)"
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

if wanted tests; then
  echo "== GPU tests (kernels at real sizes included)"
  timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | tail -15
fi

if wanted kernels; then
  echo "== kernels: axial attention and VQ lookup, Triton vs eager and compiled references"
  timeout 200 python3 scripts/bench/kernels.py --warmup 3 --iters 10 --json "$OUT/kernels.json"
fi

if wanted train_step; then
  echo "== one pre-training step of the small model at 128 px, fp16: reference vs Triton, eager vs compiled"
  for attention in reference triton; do
    timeout 60 python3 scripts/bench/train_step.py --configs small --precision fp16 --attention "$attention" \
      --json "$OUT/train_step_small_fp16_${attention}.json" 2>&1 | tail -3
    timeout 120 python3 scripts/bench/train_step.py --configs small --precision fp16 --attention "$attention" \
      --compile inductor --warmup 3 --json "$OUT/train_step_small_fp16_${attention}_compiled.json" 2>&1 | tail -3
  done
fi

if wanted tokenize; then
  workers=$(( $(nproc) - 2 ))
  echo "== tokenization: the project's VQ-VAE (goal: decode-bound), then the paper's DALL-E encoder (fp16)"
  timeout 120 python3 scripts/bench/tokenize_throughput.py --workers "$workers" --device cuda --views train \
    --per-class 16 --seconds 6 --encode-batch 512 --json "$OUT/tokenize_vqvae.json"
  timeout 70 python3 scripts/bench/tokenize_throughput.py --workers "$workers" --device cuda --views test \
    --per-class 4 --seconds 6 --kind dalle --fp16 --encode-batch 128 --json "$OUT/tokenize_dalle_fp16.json"
fi

if wanted pretrain; then
  echo "== fp16 pre-training (ds_configs/small.json engine: fp16 dynamic loss scale, ZeRO-2), tiny model, 1 GPU"
  python3 -c "from tests.synthetic_codes import write_code_database as w; w('/tmp/pt_db', videos=64)"
  DATA=/tmp/pt_db OUTPUT=/tmp/pt_run timeout 110 bash scripts/pretrain/small.sh 0 --layers 2 --hid-dim 64 --heads 2 \
    --vocab-size 64 --frame-size 32 --clip-len 4 --nce-proj-hid-dim 64 --mask-blocks 2 --batch-size 32 \
    --bs-per-gpu 16 --epochs 10 --lr 1e-2 --num-workers 2 --grad-checkpoint 2>&1 | tail -20
  cp /tmp/pt_run/metrics.jsonl "$OUT/pretrain_fp16_metrics.jsonl" 2>/dev/null
  ls /tmp/pt_run /tmp/pt_run/export 2>/dev/null
fi
