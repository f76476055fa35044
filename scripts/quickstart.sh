#!/usr/bin/env bash
# Install, then run the CPU quickstart end to end and print its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Tiny models: one thread per process beats two on a 2-core machine (less synchronisation).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
kdspec run specs/quickstart.yaml
kdspec report runs/quickstart
