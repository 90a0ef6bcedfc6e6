#!/usr/bin/env bash
# The device check on a GPU machine whose Python lacks deepspeed, lmdb and av: install their wheels from .whl/,
# then run the sections named on the command line (default: all, in this order), writing JSON and logs to $OUT:
#   tests       the GPU-marked tests (kernels at real sizes included)                             ≤ 150 s
#   selfcheck   `vimpac selfcheck` fp16 at the small (128 px) and large (256 px) shapes, bf16 small    ≤ 180 s
#   kernels     scripts/bench/kernels.py: Triton vs eager and torch.compile'd references, same run   ≤ 200 s
#   train_step  one small-model step at 128 px, fp16: reference vs Triton attention, eager and compiled ≤ 360 s
#   inference   predict/embed videos/s (scripts/bench/inference_throughput.py, long-budget sizes)    ≤ 120 s
#   inference_long  the same on 8 synthetic 60 s videos (only the evaluated frames are tokenized)  ≤ 90 s
#   tokenize    the tokenization benchmarks (VQ-VAE, DALL-E fp16)                                 ≤ 190 s
#   demo_long   `vimpac demo --budget long` (fp16, one GPU), its report and pictures copied to $OUT  ≤ DEMO_LONG_S
#   pretrain    a short fp16 pre-training run through the launcher script                         ≤ 110 s
# The limits are the sections' timeouts, not their expected times. A task's device time (15 minutes, machine
# start-up included; the machine stays warm 30 s after a call) fits about two calls, so take the sections in
# priority order over the tasks that get a device, e.g.
#   run(command="bash scripts/bench/gpu_check.sh tests selfcheck kernels", carry=[".whl"], timeout_s=540)
#   run(command="bash scripts/bench/gpu_check.sh train_step inference", carry=[".whl"], timeout_s=<left - 60>)
# and in a later task: demo_long (DEMO_LONG_S=420 by default; a rerun on the same warm machine resumes it), then
# tokenize and pretrain. Every section runs even when an earlier one failed; each prints its start time.
set -uo pipefail
OUT=${OUT:-/tmp/vimpac-gpu-check}
mkdir -p "$OUT"
SECTIONS=${*:-tests selfcheck kernels train_step inference inference_long tokenize demo_long pretrain}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, av, lmdb, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'av', av.__version__, 'deepspeed', deepspeed.__version__)"
wanted() { [[ " $SECTIONS " == *" $1 "* ]] && echo "== [$1] starts at $(date +%T)"; }
workers=$(( $(nproc) - 2 ))

if wanted tests; then
  echo "== GPU tests (kernels at real sizes included)"
  timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | tail -15
fi

if wanted selfcheck; then
  echo "== every kernel against its reference at the shipped shapes (fp16 small and large-f256, bf16 small)"
  timeout 60 python3 -m vimpac.cli selfcheck --deepspeed_config ds_configs/small.json --batch 4 \
    --json "$OUT/selfcheck_small_fp16.json" 2>&1 | tail -12
  timeout 60 python3 -m vimpac.cli selfcheck --precision bf16 --batch 4 --json "$OUT/selfcheck_small_bf16.json" \
    2>&1 | tail -12
  timeout 60 python3 -m vimpac.cli selfcheck --layers 24 --hid-dim 1024 --heads 16 --halve-att --halve-mlp \
    --frame-size 256 --deepspeed_config ds_configs/large.json --batch 2 --json "$OUT/selfcheck_large_f256_fp16.json" \
    2>&1 | tail -12
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

if wanted inference; then
  echo "== vimpac predict / embed videos/s: streamed ($workers decode workers, batched, fp16) vs one video at a time"
  timeout 120 python3 scripts/bench/inference_throughput.py --device cuda --budget long --videos 96 --repeats 2 \
    --workers "$workers" --json "$OUT/inference_gpu_long_sizes.json" 2>&1 | tail -9
fi

if wanted inference_long; then
  echo "== vimpac predict / embed videos/s on 60 s videos (the K = 5 clips read 25 of 240 frames per view)"
  timeout 90 python3 scripts/bench/inference_throughput.py --device cuda --budget long --seconds 60 --videos 8 \
    --repeats 2 --workers "$workers" --json "$OUT/inference_gpu_long_sizes_60s.json" 2>&1 | tail -9
fi

if wanted tokenize; then
  echo "== tokenization: the project's VQ-VAE (goal: decode-bound), then the paper's DALL-E encoder (fp16)"
  timeout 120 python3 scripts/bench/tokenize_throughput.py --workers "$workers" --device cuda --views train \
    --per-class 16 --seconds 6 --encode-batch 512 --json "$OUT/tokenize_vqvae.json"
  timeout 70 python3 scripts/bench/tokenize_throughput.py --workers "$workers" --device cuda --views test \
    --per-class 4 --seconds 6 --kind dalle --fp16 --encode-batch 128 --json "$OUT/tokenize_dalle_fp16.json"
fi

if wanted demo_long; then
  echo "== vimpac demo --budget long: synth, tokenizer, tokenize, fp16 pre-training and fine-tuning, report"
  timeout "${DEMO_LONG_S:-420}" python3 -m vimpac.cli demo --budget long --out /tmp/demo_long --workers "$workers" \
    > "$OUT/demo_long.log" 2>&1
  echo "demo exit code $? (124: stopped at DEMO_LONG_S=${DEMO_LONG_S:-420} s; rerun to resume)"
  tr '\r' '\n' < "$OUT/demo_long.log" | grep -v '^\s*$' | tail -40
  mkdir -p "$OUT/demo_long"
  cp /tmp/demo_long/*.json "$OUT/demo_long/" 2>/dev/null
  cp -r /tmp/demo_long/pictures /tmp/demo_long/logs "$OUT/demo_long/" 2>/dev/null
  for run in /tmp/demo_long/pretrain /tmp/demo_long/finetune_*; do
    [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/demo_long/$(basename "$run")_metrics.jsonl"
  done
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
