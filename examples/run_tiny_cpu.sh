#!/usr/bin/env bash
# The CPU demo (what `make demo` runs): a tiny model, a synthetic addition task with expert traces,
# LUFFY and on-policy GRPO trained side by side, held-out accuracy table and curves in outputs/demo/.
#   bash examples/run_tiny_cpu.sh [--steps N] [--seeds S ...] [--arms luffy grpo luffy_no_shaping]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
exec "$PYTHON" tools/run_demo.py --out "${DEMO_OUT:-outputs/demo}" "$@"
