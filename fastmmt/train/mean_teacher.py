"""MMT's mean teachers: one home for the teacher copies, their alpha and their update.

In the manner of timm's ``ModelEmaV3`` but with MMT's semantics: PARAMETERS ONLY are averaged
(BN running statistics are the teacher's own, from its forwards), and the weight of the history
grows with the step, ``alpha = min(1 - 1/(step + 1), cap)``, the step counting applied updates
from 0 over the whole run. The update goes through :func:`fastmmt.ops.ema_update_module_` (the
extension's multi-tensor kernel where it is built, else ``torch._foreach_*``).

Two ways to count steps, one formula:

- on the host (:meth:`MeanTeacher.update` with ``step``): the caller's count; the extension
  takes alpha as a number;
- on the device (``device_step=True``, :meth:`MeanTeacher.update` with ``ok``): the count is a
  float64 device tensor advanced only by applied steps, alpha is computed there and is 1 (no
  change) for a refused step, so a training step that may be refused reads nothing on the host.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fastmmt.ops import ema_update_module_


def ema_alpha(step: int | torch.Tensor, cap: float) -> float | torch.Tensor:
    """``min(1 - 1/(step + 1), cap)`` of a host step (a float) or a device step tensor (a tensor)."""
    if isinstance(step, torch.Tensor):
        return torch.clamp(1.0 - 1.0 / (step + 1.0), max=cap)
    return min(1.0 - 1.0 / (step + 1), cap)


def frozen_copy(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` whose parameters take no gradient (a teacher)."""
    teacher = copy.deepcopy(student)
    for q in teacher.parameters():
        q.requires_grad_(False)
    return teacher


class MeanTeacher:
    """The mean teachers of ``students`` (one per student, made as frozen copies of them).

    ``cap``: the largest alpha (MMT's ``ema_alpha``, 0.999). ``backend``: the EMA backend
    (``auto`` | ``ext`` | ``foreach`` | ``loop``). ``device_step``: count steps on the device
    (start from ``step``), see the module docstring.
    """

    def __init__(self, students: Sequence[nn.Module], cap: float, backend: str = "auto", *,
                 device_step: bool = False, step: int = 0) -> None:
        if not 0.0 <= cap < 1.0:
            raise ValueError(f"the mean teacher's alpha cap must be in [0, 1), got {cap}")
        self.teachers = [frozen_copy(s) for s in students]
        self.cap, self.backend = cap, backend
        self.step: torch.Tensor | None = None
        self.count_on_device(step if device_step else None)
        self.last_backend: str | None = None

    def count_on_device(self, step: int | None) -> None:
        """Count on the device from ``step`` (the run's applied steps so far), or on the host (None)."""
        if step is None:
            self.step = None
            return
        device = next(self.teachers[0].parameters()).device
        self.step = torch.tensor(float(step), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, students: Sequence[nn.Module], step: int | None = None,
               ok: torch.Tensor | None = None) -> str:
        """One mean-teacher update from ``students``; returns the EMA backend that ran.

        With a device count: ``ok`` (a bool device tensor, or None for an applied step) decides on
        the device whether the step counts. Without one: ``step`` is the host's count.
        """
        if self.step is not None:
            ok = torch.ones((), dtype=torch.bool, device=self.step.device) if ok is None else ok
            alpha = torch.where(ok, ema_alpha(self.step, self.cap), torch.ones_like(self.step))
            self.last_backend = ema_update_module_(self.teachers, list(students), alpha, backend=self.backend)
            self.step += ok.to(self.step.dtype)
        else:
            if step is None:
                raise ValueError("MeanTeacher.update: a host-counted teacher needs the step")
            self.last_backend = ema_update_module_(self.teachers, list(students), ema_alpha(step, self.cap),
                                                   backend=self.backend)
        return self.last_backend

    def state_dict(self) -> list[dict]:
        """The teachers' state dicts (what a checkpoint stores)."""
        return [t.state_dict() for t in self.teachers]

    def load_state_dict(self, states: Sequence[dict]) -> None:
        """Load the teachers' state dicts (a classifier of another size is replaced first)."""
        for t, sd in zip(self.teachers, states):
            if "classifier.weight" in sd and hasattr(t, "reset_classifier"):
                t.reset_classifier(sd["classifier.weight"])
            t.load_state_dict(sd)
            for q in t.parameters():
                q.requires_grad_(False)
