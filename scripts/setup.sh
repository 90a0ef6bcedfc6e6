#!/usr/bin/env bash
# Create (or reuse) .venv with everything vimpac needs, CPU build of torch first so pip never pulls a CUDA build.
# Usage: bash scripts/setup.sh            (idempotent: a second run only re-checks)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VIMPAC_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.vimpac-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip
  # torch first and pinned: deepspeed only asks for torch>=2, which would otherwise resolve to a multi-GB CUDA wheel.
  "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -e ".[dev]"
  # The reference DALL-E package, for the test that compares our dVAE encoder with it. It declares requirements
  # it never imports (torchvision among them, which breaks beside this torch), so: no deps, plus what it imports.
  "$PY" -m pip install -q attrs requests
  "$PY" -m pip install -q --no-deps "DALL-E==0.1"
  touch "$stamp"
fi
echo "vimpac environment ready: $VENV (activate with: . $VENV/bin/activate)"
