"""Backend choice for the fused ops.

``auto`` picks Triton for CUDA tensors, Triton on CPU when the Triton interpreter is switched on
(``TRITON_INTERPRET=1``), and the plain-torch reference otherwise. Every public op also takes an
explicit ``backend`` so tests and benchmarks can pin each path.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the triton package is installed (it is imported lazily, only when used)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    """True when Triton kernels run under the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return the concrete backend (``torch`` or ``triton``) for ``backend`` and the inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        if backend == "triton" and not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        return backend
    if not triton_available():
        return "torch"
    on_cuda = any(t.is_cuda for t in tensors)
    if on_cuda or triton_interpreter_on():
        return "triton"
    return "torch"


def float32_region(fn: F) -> F:
    """Run ``fn`` with autocast switched off (CPU and CUDA), whatever the caller enabled.

    The losses cast to float32 themselves; under autocast ``xs @ ys.t()`` would still run in
    bf16/fp16 and the ``|a|^2 + |b|^2 - 2ab`` expansion would cancel, corrupting mining, losses
    and gradients. Inputs keep their dtype: the ops upcast them.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
