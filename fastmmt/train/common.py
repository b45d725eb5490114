"""Pieces every stage shares: building models and optimisers, label and device helpers."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from fastmmt.data.augment import AugmentSpec
from fastmmt.train.distributed import DistContext
from fastmmt.train.options import DataOptions, RunOptions

log = logging.getLogger("fastmmt.train")


def trunk_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters of a re-ID network except its classifier (which MMT rebuilds every epoch):
    what the divergence guard measures."""
    return [p for name, p in model.named_parameters() if not name.startswith("classifier.")]


def compile_backbones(models: Iterable[nn.Module]) -> None:
    """``run.compile``: ``torch.compile`` each network's backbone in place (``nn.Module.compile``,
    so parameter names, state dicts and checkpoints stay those of the eager network)."""
    for m in models:
        m.backbone.compile()


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


def check_label_range(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Every trained label (outliers, -1, are not trained on) in [0, num_classes): checked once
    when the labels are made, so the loss ops need not check them in every step."""
    trained = labels[labels >= 0]
    if trained.size and int(trained.max()) >= num_classes:
        raise ValueError(f"{what}: label {int(trained.max())} outside [0, {num_classes}) for a "
                         f"classifier of {num_classes} classes")
    if (labels < -1).any():
        raise ValueError(f"{what}: label {int(labels.min())} is negative (only -1, an outlier, may be)")


def data_device_id(ctx: DistContext) -> int | None:
    """The CUDA device index a rank's DALI pipelines run on (its own ``cuda:LOCAL_RANK``), or None."""
    return ctx.device.index if ctx.device.type == "cuda" else None


def train_augment(dopts: DataOptions) -> AugmentSpec | None:
    """The loaders' ``augment`` argument for ``data.augment`` (None: the recipe)."""
    return None if dopts.augment else AugmentSpec(dopts.height, dopts.width).off()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
