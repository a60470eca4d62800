#!/usr/bin/env bash
# The main job: set up (idempotent), then run the DVC pipeline on params.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PATH="$PWD/.venv/bin:$PATH"  # the stages call `python`: the one in .venv
.venv/bin/dvc repro "$@"
