"""Test set-up: run Triton kernels under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton; without a GPU, importing triton
without it fails with "0 active drivers".
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh random generator per test; the seed is printed, FASTMMT_TEST_SEED pins it."""
    seed = int(os.environ.get("FASTMMT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (rerun with FASTMMT_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
