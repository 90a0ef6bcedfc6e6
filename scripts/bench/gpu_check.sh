#!/usr/bin/env bash
# The device check, in one call on the lent GPU machine (../shared/device/README.md): install the carried wheels,
# run the GPU-marked tests, the kernel and train-step benchmarks (Triton vs the PyTorch reference and torch.compile,
# same run), the tokenization benchmarks and a short fp16 pre-training run; results go to $OUT.
#   run(command="bash scripts/bench/gpu_check.sh", carry=[".whl"], timeout_s=...)
set -uo pipefail
OUT=${OUT:-/tmp/vimpac-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, av, lmdb, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'av', av.__version__, 'deepspeed', deepspeed.__version__)"
workers=$(( $(nproc) - 2 ))

echo "== GPU tests (kernels at real sizes included)"
timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | tail -15

echo "== kernels: axial attention and VQ lookup, Triton vs eager and compiled references"
timeout 200 python3 scripts/bench/kernels.py --warmup 3 --iters 10 --json "$OUT/kernels.json"

echo "== one pre-training step of the small model at 128 px, fp16: reference attention vs Triton"
for attention in reference triton; do
  timeout 100 python3 scripts/bench/train_step.py --configs small --precision fp16 --attention "$attention" \
    --json "$OUT/train_step_small_fp16_$attention.json" 2>&1 | tail -4
done

echo "== tokenization: the project's VQ-VAE (goal: decode-bound), then the paper's DALL-E encoder (fp16)"
timeout 120 python3 scripts/bench/tokenize.py --workers "$workers" --device cuda --views train --per-class 16 --seconds 6 \
  --encode-batch 512 --json "$OUT/tokenize_vqvae.json"
timeout 70 python3 scripts/bench/tokenize.py --workers "$workers" --device cuda --views test --per-class 4 --seconds 6 \
  --kind dalle --fp16 --encode-batch 128 --json "$OUT/tokenize_dalle_fp16.json"

echo "== fp16 pre-training (ds_configs/small.json engine: fp16 dynamic loss scale, ZeRO-2), tiny model, 1 GPU"
python3 -c "from tests.synthetic_codes import write_code_database as w; w('/tmp/pt_db', videos=64)"
DATA=/tmp/pt_db OUTPUT=/tmp/pt_run timeout 110 bash scripts/pretrain/small.sh 0 --layers 2 --hid-dim 64 --heads 2 \
  --vocab-size 64 --frame-size 32 --clip-len 4 --nce-proj-hid-dim 64 --mask-blocks 2 --batch-size 32 \
  --bs-per-gpu 16 --epochs 10 --lr 1e-2 --num-workers 2 --grad-checkpoint 2>&1 | tail -20
cp /tmp/pt_run/metrics.jsonl "$OUT/pretrain_fp16_metrics.jsonl" 2>/dev/null
ls /tmp/pt_run /tmp/pt_run/export 2>/dev/null
