"""Mean-teacher (EMA) parameter update: ``t <- alpha * t + (1 - alpha) * s``, in place.

Backends: ``foreach`` (``torch._foreach_lerp_``, always available) and ``loop`` (one
``mul_``/``add_`` pair per tensor, as the original MMT code does; kept for benchmarks).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

EMA_BACKENDS = ("auto", "foreach", "loop")


def ema_alpha(step: int, max_alpha: float = 0.999) -> float:
    """MMT's schedule ``min(1 - 1/(step+1), max_alpha)``; step counts globally from 0."""
    return min(1.0 - 1.0 / (step + 1), max_alpha)


def _check(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], alpha: float) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"ema_update_: alpha must be in [0, 1], got {alpha}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
            raise ValueError(
                f"ema_update_: tensor {i} differs: teacher {tuple(t.shape)} {t.dtype} {t.device} vs "
                f"student {tuple(s.shape)} {s.dtype} {s.device}")


@torch.no_grad()
def ema_update_(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], alpha: float, backend: str = "auto"
) -> str:
    """Update every teacher tensor in place; returns the name of the backend that ran."""
    if backend not in EMA_BACKENDS:
        raise ValueError(f"unknown EMA backend {backend!r}; expected one of {EMA_BACKENDS}")
    teacher, student = list(teacher), list(student)
    _check(teacher, student, alpha)
    if not teacher:
        return "foreach" if backend == "auto" else backend
    if backend == "loop":
        for t, s in zip(teacher, student):
            t.mul_(alpha).add_(s, alpha=1.0 - alpha)
        return "loop"
    torch._foreach_lerp_(teacher, student, 1.0 - alpha)
    return "foreach"
