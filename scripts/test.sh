#!/usr/bin/env bash
# The test command: set-up (idempotent), then the whole suite on CPU (GPU tests run where CUDA is).
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_TEST=1 bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate" 2>/dev/null || true
exec python -m pytest tests "$@"
