#!/usr/bin/env bash
# Set up this machine: the CPU build of torch first (an unpinned torch can pull a multi-GB CUDA build),
# then the package with its dependencies (DeepSpeed builds from source without its CUDA ops).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    "$PY" -m pip install --quiet --root-user-action=ignore "torch==2.13.0"
fi
DS_BUILD_OPS=0 "$PY" -m pip install --quiet --root-user-action=ignore -e ".[dev]"
