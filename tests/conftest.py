"""Test set-up: run Triton kernels under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton; without a GPU, importing triton
without it fails with "0 active drivers".
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every core unless OMP_NUM_THREADS says otherwise (parallel slow runs use one thread each: two
# 2-thread processes on 2 cores make OpenMP spin-wait, several times slower)
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh random generator per test; the seed is printed, FASTMMT_TEST_SEED pins it."""
    seed = int(os.environ.get("FASTMMT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (rerun with FASTMMT_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
