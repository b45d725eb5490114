"""Load ImageNet weights for a backbone from a local file (torchvision or IBN-Net key format).

Never downloads. Accepted files: a plain state dict, or a checkpoint dict holding one under
``"state_dict"`` (IBN-Net's ``*.pth.tar``); a ``module.`` prefix (DataParallel) is stripped and
the classifier ``fc.*`` is ignored. Missing and unexpected keys are logged and returned.
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import nn

from fastmmt.safe_load import safe_load

log = logging.getLogger(__name__)


class LoadReport(NamedTuple):
    """Keys of the backbone the file did not provide, and keys of the file nothing used."""

    missing: list[str]
    unexpected: list[str]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file with ``module.`` stripped and ``fc.*`` dropped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path} (no downloads are made)")
    obj = safe_load(path)  # never runs code stored in the file
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith("fc.") or not isinstance(value, torch.Tensor):
            continue
        out[key] = value
    return out


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Copy the weights in ``path`` into ``backbone`` (non-strict); shape mismatches are errors."""
    state = read_state_dict(path)
    own = backbone.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{os.fspath(path)}: shape of {key!r} is {tuple(value.shape)} in the "
                             f"file but {tuple(own[key].shape)} in the model (arch/base_width?)")
    result = backbone.load_state_dict(state, strict=False)
    report = LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys))
    if report.missing or report.unexpected:
        log.warning("loaded %s: %d missing keys %s, %d unexpected keys %s", os.fspath(path),
                    len(report.missing), report.missing[:10], len(report.unexpected),
                    report.unexpected[:10])
    else:
        log.info("loaded %s: all %d backbone tensors matched", os.fspath(path), len(own))
    return report
