# Shared by the pre-training and fine-tuning scripts (sourced, not run): launch an entry point on the GPUs listed.
# Usage inside a script: launch vimpac.pretrain GPU_LIST --deepspeed_config ds_configs/x.json [flags...]
# ENTRY is a module (vimpac.pretrain, vimpac.finetune: run with deepspeed --module, from the installed package) or
# a script path ending in .py (vimpac/pretrain.py).
# GPU_LIST is the seed's comma list (0,1,2,3 → --include localhost:0,1,2,3), or cpu:N for N CPU ranks (add
# --deepspeed_config ds_configs/cpu.json, or finetune_cpu.json for fine-tuning, after it: later flags win).
set -euo pipefail
# The scripts run from the repository root (ds_configs/ is relative to it). Every other relative path is relative
# to where the user stands, the scripts' defaults included: the variables here and the path flags in `launch` are
# made absolute against it first.
USER_DIR=$PWD
for name in DATA EVAL_DATA LOAD OUTPUT STAGE1; do
  if [ -n "${!name:-}" ] && [[ ${!name} != /* ]]; then
    printf -v "$name" '%s' "$USER_DIR/${!name}"
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
    export DS_ACCELERATOR=cpu  # CPU ranks even where a GPU is visible
  fi
  local target=(--module "$entry")
  if [[ $entry == *.py ]]; then target=("$entry"); fi
  # Path flags are relative to where the user stands; a --deepspeed_config found there wins over one here.
  local args=() previous=""
  for arg in "$@"; do
    if [[ $arg != /* ]] && case $previous in
      --output | --data | --eval-data | --load | --resume-from | --knn-monitor) true ;;
      --deepspeed_config) [ -e "$USER_DIR/$arg" ] && [ ! -e "$arg" ] ;;
      *) false ;;
    esac; then
      arg="$USER_DIR/$arg"
    fi
    args+=("$arg")
    previous=$arg
  done
  # Another launch on this machine may hold 29500: without MASTER_PORT, take a free port.
  local port=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
  deepspeed "${where[@]}" --master_port "$port" "${target[@]}" "${args[@]}"
}
