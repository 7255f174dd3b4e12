#!/usr/bin/env bash
# The whole GPU measurement in one call on a lent machine (no network; torch and accelerate are the machine's):
#   bash bench/device.sh            # results (table.md, rows.json, profile-ROW.txt, machine.txt) in $OUT
# It installs the tested set's other wheels from .whl/, fetched beforehand on a machine with PyPI:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#     transformers==5.24.0 tokenizers==0.23.3 fsspec==2026.9.0
# ROWS and BUDGET_S choose the bench rows and when optional rows are skipped (see bench/train_speed.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DPOLAB_CACHE=/tmp/dpolab-cache
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, transformers, trl, accelerate; print(sys.version.split()[0], torch.__version__,
transformers.__version__, trl.__version__, accelerate.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
  date -u
} > "$OUT/machine.txt"
ROWS=${ROWS:-trl-default,dpolab-fast,dpolab-fast-compile,dpolab-fast-compile-cudagraphs,cli-smoke,cli-full}
python3 bench/train_speed.py --device cuda --steps 40 --profile --out "$OUT" --work /tmp/bench-work \
  --rows "$ROWS" --budget_s "${BUDGET_S:-420}"
