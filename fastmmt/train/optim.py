"""The optimiser of a training stage and what it trains."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastmmt.train.options import RunOptions


def trunk_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters of a re-ID network except its classifier (which MMT rebuilds every epoch):
    what the divergence guard measures."""
    return [p for name, p in model.named_parameters() if not name.startswith("classifier.")]


def adam(models: Iterable[nn.Module], lr: float, weight_decay: float, impl: str = "default") -> torch.optim.Adam:
    """Adam over every trainable parameter of ``models`` (coupled L2 weight decay, as the reference).

    ``impl`` (see :func:`adam_impl`): ``default`` (torch's choice: the per-tensor loop on the CPU,
    ``foreach`` on CUDA), ``foreach`` (the same arithmetic, bit for bit, on tensor lists; its step counters are
    host tensors, so it reads no device value) or ``fused`` (torch's fused kernel: it takes a
    device-side ``found_inf`` flag, set as ``optimizer.found_inf``, and then leaves parameters,
    moments and step counts unchanged, so a refused step needs no host read; it rounds the update
    in another order than the loop).
    """
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    extra = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **extra)


def adam_impl(ropts: RunOptions) -> str:
    """The Adam of a run: ``default`` for the old step (``run.sync_each_step``), ``fused`` when a
    refused step must be skipped without a host read (``run.on_nonfinite=skip``), else ``foreach``
    (under ``stop`` a non-finite step ends the run before anything is written)."""
    if ropts.sync_each_step:
        return "default"
    return "fused" if ropts.on_nonfinite == "skip" else "foreach"
