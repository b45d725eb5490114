"""A step's inputs: the labels it may train on, the device its batches go to, their augmentation."""
from __future__ import annotations

import numpy as np
import torch

from fastmmt.data.augment import AugmentSpec
from fastmmt.train.distributed import DistContext
from fastmmt.train.options import DataOptions


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
    """A batch tensor on the run's device (an asynchronous copy from pinned memory), channels-last
    when the network is."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
