#!/usr/bin/env bash
# The tests: set up (idempotent), then pytest (unit, integration, e2e). GPU/TensorRT tests skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest tests "$@"
