#!/usr/bin/env bash
# Install, then run the test suite (slow end-to-end runs included unless KDSPEC_FAST=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
markers=()
if [ "${KDSPEC_FAST:-0}" = "1" ]; then markers=(-m "not slow"); fi
exec python3 -m pytest -q "${markers[@]}" "$@"
