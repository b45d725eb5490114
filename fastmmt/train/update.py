"""The one update path every training step ends with, and the one place that decides what a
non-finite step does: loss -> finite check -> skip/stop policy -> backward -> optimiser step -> BN
buffers from rank 0 -> mean-teacher update.

``run.on_nonfinite``: ``stop`` ends the run naming the batch, ``skip`` refuses the step (no weight,
optimiser or teacher change) and goes on. The default step reads nothing on the host: its finite
flag goes to a fused optimiser (``found_inf``) and to the mean teacher (alpha 1), and the runner acts
on the window's flags at log points (:func:`check_window`); ``run.sync_each_step`` reads every loss
on the host instead (:func:`step_is_finite`). fp16 needs no GradScaler here: it is refused where
the options are made (``FP16_REFUSED``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastmmt.train import distributed as ddp
from fastmmt.train.distributed import DistContext, all_true
from fastmmt.train.mean_teacher import MeanTeacher
from fastmmt.train.options import ExperimentOptions, RunOptions
from fastmmt.train.runtime import Runtime

log = logging.getLogger("fastmmt.train")


@dataclass
class StepContext:
    """What a training step works on, instead of a long parameter list: the networks as trained
    (``nets``: DDP-wrapped under torchrun), the ``students`` they wrap, the optimiser, the mean
    teachers (MMT only), the options, the runtime, and ``info`` (the step reports the EMA backend
    that ran there). Stages rebuild it when the optimiser or the wrapping changes (each MMT epoch).
    """

    nets: list[nn.Module]
    students: list[nn.Module]
    optimizer: torch.optim.Optimizer
    opts: ExperimentOptions
    rt: Runtime
    mean_teacher: MeanTeacher | None = None
    info: dict = field(default_factory=dict)


class NonFiniteLossError(FloatingPointError):
    """A loss or feature became NaN/inf: the step is refused (nothing is updated)."""


def step_is_finite(value: torch.Tensor, what: str | Callable[[], str], policy: str = "stop",
                   ctx: DistContext | None = None) -> bool:
    """Whether the step with loss ``value`` may proceed; a NaN/inf loss (on any rank) refuses it.

    ``policy="stop"`` raises :class:`NonFiniteLossError` naming the batch (``what``); ``"skip"``
    logs a warning and returns False (the caller skips backward, optimiser and EMA). This reads
    the loss on the host: the ``run.sync_each_step`` step only.
    """
    v = float(value.detach())
    finite = math.isfinite(v)
    if ctx is not None:
        finite = all_true(finite, ctx)
    if finite:
        return True
    msg = f"non-finite loss ({v}) at {what() if callable(what) else what}; the step was refused"
    if policy == "stop":
        raise NonFiniteLossError(msg + " and the run stopped (run.on_nonfinite=skip skips such steps)")
    log.warning("%s and skipped (run.on_nonfinite=skip)", msg)
    return False


def refuse_if_not_finite(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """Hand the step's finite flag to a fused optimiser (no update when it is False); other
    optimisers apply the step (``stop`` ends the run at the next read of the flag)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).to(torch.float32)


def finite_flag(loss: torch.Tensor, ctx: ddp.DistContext) -> torch.Tensor:
    """Whether ``loss`` is finite on every rank, as a bool tensor on the device (never read here)."""
    return ddp.all_true_tensor(torch.isfinite(loss.detach()), ctx)


def apply_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, modules: list[nn.Module],
                 r: RunOptions, ctx: ddp.DistContext, where: str | Callable[[], str],
                 mean_teacher: MeanTeacher | None = None, students: list[nn.Module] | None = None,
                 global_step: int = 0, info: dict | None = None) -> torch.Tensor | None:
    """The update every step ends with: check the loss, backward of the global loss, optimiser
    step, BN buffers from rank 0 (as DataParallel kept GPU 0's), then the mean teachers' update
    from ``students`` when there is a ``mean_teacher`` (``info["ema_backend"]`` names its backend).

    Returns the step's finite flag (a bool tensor, never read here), or None when the
    ``run.sync_each_step`` step read a non-finite loss under ``skip`` (nothing was applied).
    Without ``run.sync_each_step`` the flag goes to a fused optimiser as its ``found_inf``
    (``skip``: no weight changes) and the runner reads it at the next log point.
    """
    if r.sync_each_step:
        if not step_is_finite(loss, where, r.on_nonfinite, ctx):
            return None
        ok = torch.tensor(True)
    else:
        ok = finite_flag(loss, ctx)
        refuse_if_not_finite(optimizer, ok)
    optimizer.zero_grad(set_to_none=True)
    (loss * ctx.world_size).backward()  # DDP averages: the gradient of the global loss
    optimizer.step()
    ddp.broadcast_buffers(modules, ctx)
    if mean_teacher is not None:  # alpha 1 for a refused step when it counts on the device
        backend = mean_teacher.update(students, step=global_step, ok=ok)
        if info is not None:
            info["ema_backend"] = backend
    return ok


def check_window(w: dict, first_it: int, last_it: int, policy: str, describe: Callable[[int], str],
                  log_every: int) -> None:
    """Act on a window's non-finite steps: raise (stop) or warn (skip)."""
    if not w["bad"] or w["first_bad"] < 0:
        return
    what = (f"non-finite loss ({w['bad_loss']}) at {describe(w['first_bad'])}; {w['bad']} of the steps of "
            f"iterations {first_it}-{last_it} (one run.log_every={log_every} window) were non-finite")
    if policy == "stop":
        raise NonFiniteLossError(what + "; the run stopped (run.on_nonfinite=skip skips such steps)")
    log.warning("%s and were skipped (run.on_nonfinite=skip)", what)
