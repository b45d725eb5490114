#!/usr/bin/env bash
# Does fastmmt's GPU path work on this machine? Builds the CUDA extension for this GPU, runs the test
# suite with the gpu tests, compute-sanitizer on every Triton kernel, the loss/EMA/pipeline benchmarks
# and a profiled synthetic MMT run, and writes gpu_check/REPORT.md (fastmmt/tools/gpu_check.py says
# what each step does). The exit code is 0 only when every part that ran passed.
#   bash scripts/gpu_check.sh [--system] [--quick] [--iters N] [--jobs N] [--out DIR]
# --system: no package registry needed. Uses the machine's own python3 (FASTMMT_PYTHON overrides)
#   with its CUDA torch and Triton, runs fastmmt from this checkout and installs nothing; what is
#   missing there (DALI, faiss-gpu, compute-sanitizer) is reported as "not installed here".
# Default: sets up .venv (scripts/dev.sh, which keeps python3's CUDA torch) and installs the rest.
# Without an NVIDIA driver listing a GPU it says so in one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
system=0
args=()
for a in "$@"; do
  if [ "$a" = --system ]; then system=1; else args+=("$a"); fi
done
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check: no NVIDIA GPU or driver on this machine (nvidia-smi lists none); nothing to check"
  exit 0
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
if [ "$system" = 1 ]; then
  PY="${FASTMMT_PYTHON:-python3}"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PY" -m fastmmt.tools.gpu_check --env system ${args[@]+"${args[@]}"}
fi
bash scripts/dev.sh setup || exit 1
exec "${FASTMMT_VENV:-.venv}/bin/python" -m fastmmt.tools.gpu_check --env venv ${args[@]+"${args[@]}"}
