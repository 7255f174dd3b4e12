#!/usr/bin/env bash
# The whole GPU measurement in one call on a lent machine (no network; torch and accelerate are the machine's):
#   bash bench/device.sh     # in $OUT: table.md, rows.json, profiles.txt, machine.txt, doctor.txt, gradients.txt,
#                            # gradients.json, log.txt
# It installs the tested set's other wheels from .whl/, fetched beforehand on a machine with PyPI:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 \
#     dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 tokenizers==0.23.3 fsspec==2026.9.0
# (tokenizers' wheel is tagged manylinux_2_17 only)
# ROWS chooses the bench rows (see bench/train_speed.py); BUDGET_S is when optional rows stop being started,
# DEADLINE_S when every row is stopped (keep it under the call's timeout: the table is written after each row),
# ROW_CAP_S when one row is (a hung row must not take the rest's time); PROFILE=0 leaves the profiles out.
# DEVICE=cpu runs the same script here with the venv's python3 first on PATH, as a check of the script itself
# (a 2-layer model, 20 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then  # the wheels are Python 3.12's, the lent machine's; here the venv has the tested set
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS=recompiles  # why a compiled row compiled again, in log.txt
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import sys, torch, transformers, trl, accelerate; print(sys.version.split()[0], torch.__version__,
transformers.__version__, trl.__version__, accelerate.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
  date -u
} > "$OUT/machine.txt"
# dpolab's own checks on the lent machine (a few seconds)
python3 -m dpolab.cli doctor > "$OUT/doctor.txt" 2>&1 || true
# the CUDA-graph modes' gradients against eager's, before any of their speeds is read: FlashAttention's varlen kernel
# on rows of fixed shapes under bf16 autocast, then FlexAttention in float32 (~1 minute on a GPU, estimated; at most
# 2, which the rows' deadline below leaves room for: each verdict is written when known; ~2.5 on this project's CPU)
GRADIENTS_CAP_S=$([ "$DEVICE" = cuda ] && echo 120 || echo 900)
timeout "$GRADIENTS_CAP_S" python3 bench/backbone_gradients.py --device "$DEVICE" --out "$OUT" > "$OUT/gradients.txt" \
  2>&1 || true
tail -1 "$OUT/gradients.txt"
# The issue's side by side first (~2 minutes on an H200), then the host's levers, the step being bound by the host
# (bench/RESULTS.md, fourteenth section): CUDA graphs over the whole backbone (the lever that may reach 35% MFU; its
# first step compiles one decoder layer for all, 190 s on an H200 when they were traced one by one), first with
# FlashAttention's varlen kernel (3x less attention time than FlexAttention on the H200, and no FlexAttention kernels
# to compile: the likelier of the two to reach 35% MFU, and the sooner done), then with FlexAttention, the same
# backbone without graphs (fewer compiled calls alone), inductor's C++ wrapper; then the full preset's whole-epoch
# setting through the CLI (~2 minutes), FlashAttention's varlen kernel, TRL's default with eager attention (how far
# two correct bf16 runs' losses drift apart), FlexAttention alone, and the gains' attribution.
ROWS=${ROWS:-trl-default,dpolab-fast-compile,dpolab-fast-compile-varlen-cudagraphs,\
dpolab-fast-compile-backbone-cudagraphs,dpolab-fast-compile-backbone,\
dpolab-fast-compile-cpp-wrapper,cli-full,dpolab-fast-compile-varlen,trl-default-eager-attention,flex-attention,\
dpolab-fast-compile-backbone-cudagraphs-gqa,dpolab-fast-compile-host-waits,\
dpolab-fast-compile-b16,dpolab-fast-compile-gqa,\
dpolab-fast-compile-log10,dpolab-fast-compile-trl-head,dpolab-fast,cli-smoke,reference-prepass,cli-smoke-eager,\
dpolab-fast-sdpa}
STEPS=$([ "$DEVICE" = cuda ] && echo 40 || echo 20)
PROFILE_FLAG=$([ "${PROFILE:-1}" = 1 ] && echo --profile || true)
python3 bench/train_speed.py --device "$DEVICE" --steps "$STEPS" $PROFILE_FLAG --out "$OUT" --work /tmp/bench-work \
  --rows "$ROWS" --budget_s "${BUDGET_S:-380}" --deadline_s "${DEADLINE_S:-490}" --row_cap_s "${ROW_CAP_S:-240}" \
  2>&1 | tee "$OUT/log.txt"
