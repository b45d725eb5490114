#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv in the checkout (torch 2.13.0 CPU build
# from local disk unless a torch is already there, triton, faiss, DALI, the C++ extension),
# then runs what you ask for.
#   bash scripts/dev.sh demo [args]   the synthetic MMT demo (fastmmt demo)
#   bash scripts/dev.sh test [args]   the test suite without `slow` tests
#   bash scripts/dev.sh slow [args]   the `slow` tests only
#   bash scripts/dev.sh bench [args]  the benchmarks (pytest-benchmark)
#   bash scripts/dev.sh setup         set up only
#   bash scripts/dev.sh system-torch  print where python3's CUDA torch lives (what setup links), if any
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTMMT_VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.fastmmt-setup"

# The site-packages folder of python3's torch when that torch is a CUDA build (a GPU machine or a
# cluster image), else nothing: the venv then uses it instead of installing the CPU wheel.
system_cuda_torch_site() {
  python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)) if torch.version.cuda else "")' \
    2>/dev/null || true
}

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local site
  site="$(system_cuda_torch_site)"
  if [ -n "$site" ]; then
    echo "$site" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fastmmt-system-torch.pth"
    echo "[dev.sh] using python3's CUDA torch from $site" >&2
  fi
  if [ -f "$STAMP" ] && [ -z "$(find setup.py csrc -newer "$STAMP" -print -quit)" ]; then
    return 0
  fi
  echo "[dev.sh] setting up $VENV" >&2
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  # A CUDA machine keeps the torch it has (linked above); otherwise the CPU wheel on local disk.
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
  # triton 3.8.0 is the release torch pins and installs from local disk here.
  "$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton==3.8.0
  "$PY" -m pip install -q numpy ninja
  "$PY" -m pip install -q --no-build-isolation -e ".[test]"
  touch "$STAMP"
}

cmd="${1:-demo}"
shift || true
if [ "$cmd" = system-torch ]; then system_cuda_torch_site; exit 0; fi
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
