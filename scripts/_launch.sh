# Shared by the pre-training and fine-tuning scripts (sourced, not run): launch an entry point on the GPUs listed.
# Usage inside a script: launch vimpac.pretrain GPU_LIST --deepspeed_config ds_configs/x.json [flags...]
# ENTRY is a module (vimpac.pretrain, vimpac.finetune: run with deepspeed --module, from the installed package) or
# a script path ending in .py (vimpac/pretrain.py).
# GPU_LIST is the seed's comma list (0,1,2,3 → --include localhost:0,1,2,3), or cpu:N for N CPU ranks (add
# --deepspeed_config ds_configs/cpu.json after it: later flags win).
set -euo pipefail
# The scripts run from the repository root (ds_configs/ is relative to it): paths given relative to where the
# user stands are made absolute first.
for name in DATA EVAL_DATA LOAD OUTPUT STAGE1; do
  if [ -n "${!name:-}" ] && [[ ${!name} != /* ]]; then
    printf -v "$name" '%s' "$PWD/${!name}"
  fi
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The launcher of this checkout's environment (bash scripts/setup.sh) when it is not activated.
if ! command -v deepspeed >/dev/null && [ -x .venv/bin/deepspeed ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
if ! command -v deepspeed >/dev/null; then
  echo "no deepspeed launcher on PATH: run bash scripts/setup.sh, then . .venv/bin/activate (or install vimpac)" >&2
  exit 2
fi
# One JIT build of DeepSpeed's ops per environment (docs/design.md §11.2), reused by every later run.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(python3 -c 'import sys; print(sys.prefix)')/torch_extensions}

launch() {
  local entry=$1 gpus=$2
  shift 2
  if [ -z "$gpus" ]; then
    echo "usage: bash $0 GPU_LIST [extra flags]   e.g. bash $0 0,1,2,3 --epochs 5 (cpu:2 for 2 CPU ranks)" >&2
    exit 2
  fi
  local where=(--include "localhost:$gpus")
  if [[ $gpus == cpu:* ]]; then
    where=(--num_gpus "${gpus#cpu:}")  # the CPU accelerator shows one device, so no --include list
  fi
  local target=(--module "$entry")
  if [[ $entry == *.py ]]; then target=("$entry"); fi
  deepspeed "${where[@]}" --master_port "${MASTER_PORT:-29500}" "${target[@]}" "$@"
}
