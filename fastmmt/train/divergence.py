"""The divergence guard: a run whose weights blow up without a NaN stops before it is saved.

A learning rate one zero too high makes Adam move every weight by about that rate at each step;
the weights grow by orders of magnitude while the loss can stay finite, the next clustering fails
on degenerate features, and a bad checkpoint has already replaced the good one.
:class:`DivergenceGuard` measures the norm of the trained parameters on the device at the points
where the runner already reads the loss sums (every ``run.log_every`` iterations and the last of
each epoch, one host transfer for both) and stops the run when it exceeds ``run.diverge_factor``
times its value at the start of the run. Healthy training moves the total norm by far less (BN
makes most weights scale-invariant, weight decay pulls them back). The check runs before the
epoch's checkpoint is written, so the last checkpoint on disk is one from before the blow-up.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


class DivergenceError(ArithmeticError):
    """The trained weights grew past ``run.diverge_factor`` times their starting norm."""


def parameter_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``params`` together, as a float64 device tensor (never read here)."""
    norms = torch._foreach_norm([p.detach() for p in params])
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms]))


class DivergenceGuard:
    """Weight-norm growth of a stage's trained parameters against the run's start.

    ``params``: the parameters the optimiser trains (called at each measure: a stage may rebuild
    its classifier); ``lr_note``: the learning-rate options to name when the guard fires.
    """

    def __init__(self, params: Callable[[], list[torch.Tensor]], factor: float, lr_note: Callable[[], str]) -> None:
        self.params, self.factor, self.lr_note = params, factor, lr_note
        self.ref = parameter_norm(params())  # stays on the device

    def measure(self) -> torch.Tensor:
        """[current norm, starting norm] on the device, to be read with the loss sums."""
        return torch.stack([parameter_norm(self.params()), self.ref])

    def check(self, values: list[float], where: Callable[[], str]) -> None:
        """Raise :class:`DivergenceError` naming ``where()`` (the step, built only then) and the
        learning rate when the norm read with :meth:`measure` is past the factor (or not finite)."""
        norm, ref = values
        if math.isfinite(norm) and norm <= self.factor * ref:
            return
        growth = norm / ref if ref else math.inf
        raise DivergenceError(
            f"the run is diverging at {where()}: the norm of the trained weights grew from {ref:.4g} at the start "
            f"of the run to {norm:.4g} ({growth:.3g}x, past run.diverge_factor={self.factor:g}) without a "
            f"non-finite loss; the likely cause is too high a learning rate ({self.lr_note()}): lower it. The "
            f"run stopped before writing a checkpoint, so the last one written is from before this (resume from "
            f"it with a lower rate); run.diverge_factor=0 turns this check off")
