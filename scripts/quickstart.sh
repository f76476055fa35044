#!/usr/bin/env bash
# Install, then run the CPU quickstart end to end and print its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
kdspec run specs/quickstart.yaml
kdspec report runs/quickstart
