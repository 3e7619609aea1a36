#!/usr/bin/env bash
# Set up this machine and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
exec python3 -m pytest -q "$@"
