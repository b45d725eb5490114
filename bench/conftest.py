"""Test set-up: run Triton kernels under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton; without a GPU, importing triton
without it fails with "0 active drivers".
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if not os.environ.get("OMP_NUM_THREADS"):  # a thread count given for the run is kept
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One intra-op thread for a benchmark: on a shared machine, OpenMP threads stall whenever
    another core is busy, which swamps the measurement (files opt in with ``usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
