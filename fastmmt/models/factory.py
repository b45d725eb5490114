"""The run's network factory: the re-ID network with its BN split and memory format, on a device."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from fastmmt.models.bn_split import convert_bn_split
from fastmmt.models.reid import ReIDNet, build_model


class NetworkOptions(Protocol):
    """What the factory reads of a run's model options (``fastmmt.train.options.ModelOptions``)."""

    arch: str
    base_width: int
    dropout: float
    channels_last: bool


def make_model(mopts: NetworkOptions, num_classes: int, device: torch.device, bn_split: int = 0,
               pretrained: str | None = None, fused_bn_split: bool = False) -> ReIDNet:
    """Build the re-ID network on ``device`` with the run's BN split and memory format; the
    options it was built with stay on it as ``model.model_options`` (what a model file records)."""
    model = build_model(mopts.arch, num_classes, dropout=mopts.dropout, pretrained=pretrained,
                        base_width=mopts.base_width)
    model.model_options = mopts
    convert_bn_split(model, bn_split, fused=fused_bn_split)
    model = model.to(device)
    if mopts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_backbones(models: Iterable[nn.Module]) -> None:
    """``run.compile``: ``torch.compile`` each network's backbone in place (``nn.Module.compile``,
    so parameter names, state dicts and checkpoints stay those of the eager network)."""
    for m in models:
        m.backbone.compile()
