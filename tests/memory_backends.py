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

# float32 kernels against float64: loss relative, gradient relative to the largest entry, memory absolute
LOSS_TOL, GRAD_TOL, MEM_TOL = 2e-5, 1e-4, 2e-5


def assert_step_matches_reference(loss: torch.Tensor, grad: torch.Tensor, mem: torch.Tensor, dtype: torch.dtype,
                                  ref_loss: torch.Tensor, ref_grad: torch.Tensor, ref_mem: torch.Tensor) -> None:
    """One training step of a memory op against its float64 transcription: a float32 loss, the
    input's gradient in the input's dtype (bf16/fp16 inputs: 1e-2 of the largest entry), the
    memory after the update."""
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.allclose(loss.double().cpu(), ref_loss.detach(), rtol=LOSS_TOL, atol=0)
    grad_tol = GRAD_TOL if dtype == torch.float32 else 1e-2
    err = (grad.double().cpu() - ref_grad).abs().max() / ref_grad.abs().max()
    assert err < grad_tol, f"gradient error {err:.2e}"
    assert (mem.double().cpu() - ref_mem).abs().max() < MEM_TOL


def device_for(backend: str, device: torch.device) -> torch.device:
    """The device a backend's test runs on: ``ext`` takes CPU tensors only."""
    return torch.device("cpu") if backend == "ext" else device
