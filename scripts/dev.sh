#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv in the checkout (torch 2.13.0 CPU build
# from local disk unless a torch is already there, triton, faiss, DALI, the C++ extension),
# then runs what you ask for.
#   bash scripts/dev.sh demo [args]   the synthetic MMT demo (fastmmt demo)
#   bash scripts/dev.sh test [args]   the test suite without `slow` tests
#   bash scripts/dev.sh slow [args]   the `slow` tests only
#   bash scripts/dev.sh bench [args]  the benchmarks (pytest-benchmark)
#   bash scripts/dev.sh setup         set up only
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTMMT_VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.fastmmt-setup"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  if [ -f "$STAMP" ] && [ -z "$(find setup.py csrc -newer "$STAMP" -print -quit)" ]; then
    return 0
  fi
  echo "[dev.sh] setting up $VENV" >&2
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  # A CUDA machine keeps the torch it has; otherwise the CPU wheel on local disk.
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
  # triton 3.8.0 is the release torch pins and installs from local disk here.
  "$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton==3.8.0
  "$PY" -m pip install -q numpy ninja
  "$PY" -m pip install -q --no-build-isolation -e ".[test]"
  touch "$STAMP"
}

cmd="${1:-demo}"
shift || true
setup
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
case "$cmd" in
  setup) ;;
  demo) exec "$VENV/bin/fastmmt" demo "$@" ;;
  test) exec "$PY" -m pytest tests -m "not slow" -q "$@" ;;
  slow) exec "$PY" -m pytest tests -m slow -q "$@" ;;
  bench) exec "$PY" -m pytest bench -q --benchmark-columns=min,median,mean,rounds "$@" ;;
  *) echo "unknown command: $cmd (demo|test|slow|bench|setup)" >&2; exit 2 ;;
esac
