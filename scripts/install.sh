#!/usr/bin/env bash
# Install kdspec with its backends and test tools into the current Python environment.
# Users bring their own (CUDA) torch; on a machine without a GPU and without torch, put the CPU
# build (2.13.0) in place first, so that pip does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[torch,jax,dev]"
