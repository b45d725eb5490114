#!/usr/bin/env bash
# Does fastmmt's GPU path work on this machine? Sets up .venv (scripts/dev.sh), builds the CUDA
# extension for this GPU, runs the whole test suite with the gpu tests, compute-sanitizer on every
# Triton kernel, the loss/EMA/pipeline benchmarks and a profiled synthetic MMT run, and writes
# gpu_check/REPORT.md (fastmmt/tools/gpu_check.py says what each step does).
#   bash scripts/gpu_check.sh [--quick] [--iters N] [--out DIR]
# Without an NVIDIA driver it says so in one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU or driver on this machine (nvidia-smi finds none); nothing to check"
  exit 0
fi
bash scripts/dev.sh setup || exit 1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "${FASTMMT_VENV:-.venv}/bin/python" -m fastmmt.tools.gpu_check "$@"
