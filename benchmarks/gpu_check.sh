#!/usr/bin/env bash
# The GPU check (one script, under 8 minutes on one H100/H200): stage 1 at BERT-base size in bf16 against the
# stock recipe, with and without torch.compile, MFU, then stage 2 from that checkpoint. Writes
# benchmarks/results/gpu_check.json. `--dry` runs the same steps with a tiny model on any device (CI, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_check.py "$@"
