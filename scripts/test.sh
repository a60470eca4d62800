#!/usr/bin/env bash
# The tests: set up (idempotent), then pytest (unit, integration, e2e). GPU/TensorRT tests skip with a reason.
# Two pytest-xdist workers by default (one per core of the 2-core CI box; tests go out one by one, except that a
# module with a module-scoped fixture stays on one worker, tests/conftest.py). PYTEST_WORKERS=0: one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
export PATH="$PWD/.venv/bin:$PATH"
workers=${PYTEST_WORKERS:-2}
if [ "$workers" -gt 0 ]; then
  .venv/bin/python -m pytest tests -n "$workers" --dist loadgroup "$@"
else
  .venv/bin/python -m pytest tests "$@"
fi
