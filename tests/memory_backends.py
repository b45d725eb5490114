"""The backends the memory-bank tests run: ``torch``, ``triton`` (compiled on CUDA, interpreted on
CPU) and ``ext`` (the compiled extension's CPU update; skipped only when ``fastmmt._C`` is not built
with it). ``ext`` runs on CPU tensors whatever the test device."""
from __future__ import annotations

import pytest
import torch

from fastmmt.ops.memory import _ext

EXT_BUILT = _ext() is not None
EXT_SKIP = "fastmmt._C is not built with the memory update (python setup.py build_ext --inplace)"
EXT = pytest.param("ext", marks=pytest.mark.skipif(not EXT_BUILT, reason=EXT_SKIP))
BACKENDS = ["torch", "triton", EXT]
FLOAT64_BACKENDS = ["torch", EXT]  # the Triton backend keeps the memory in float32


def device_for(backend: str, device: torch.device) -> torch.device:
    """The device a backend's test runs on: ``ext`` takes CPU tensors only."""
    return torch.device("cpu") if backend == "ext" else device
