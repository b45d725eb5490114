"""Read the model files of the official MMT release (``*.pth.tar``) into a :class:`ReIDNet`.

The official code (github.com/yxgeee/MMT) saves ``{"state_dict", "epoch", "best_mAP"}`` with the
keys of its own network, prefixed ``module.`` by DataParallel. Its trunk is one
``nn.Sequential`` called ``base``:

- ResNet (no stem ReLU): ``base.0`` conv1, ``base.1`` bn1, ``base.2`` maxpool (no tensors),
  ``base.3``-``base.6`` layer1-4;
- IBN-ResNet-a: ``base.0`` conv1, ``base.1`` bn1, ``base.2`` ReLU, ``base.3`` maxpool (neither
  holds tensors), ``base.4``-``base.7`` layer1-4;

then ``feat_bn`` (the BN neck) and ``classifier`` (no bias). Inside a stage the keys are
torchvision's / IBN-Net's, which fastmmt's backbone uses too. The released source models have one
classifier row per source identity, the k-means MMT models one per cluster, and the DBSCAN MMT
models one per target training image (the official code sizes it so); the classifier is loaded
as it is (evaluation does not use it, and MMT replaces it at every epoch).

The architecture (plain or IBN, blocks per stage, stem width) is read from the tensors, so the
file alone describes the network; layer4's stride is 1, as in the official code.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastmmt.models.reid import ReIDNet
from fastmmt.models.resnet import ARCHS, BasicBlock, Bottleneck, build_backbone
from fastmmt.safe_load import safe_load

# base index -> fastmmt backbone module, per trunk layout
_RESNET_BASE = {0: "conv1", 1: "bn1", 3: "layer1", 4: "layer2", 5: "layer3", 6: "layer4"}
_IBN_BASE = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
_HEAD = {"feat_bn": "bn_neck", "classifier": "classifier"}
_BASE_KEY = re.compile(r"base\.(\d+)\.(.+)")


class NotOfficialCheckpointError(ValueError):
    """The tensors are not in the official MMT release's key layout."""


@dataclass
class OfficialCheckpoint:
    """An official release file converted to fastmmt's key names.

    ``state_dict`` holds :class:`ReIDNet` keys (``backbone.*``, ``bn_neck.*``, ``classifier.weight``);
    ``arch`` / ``base_width`` / ``num_classes`` are what :func:`build_model` needs to hold it;
    ``epoch`` and ``best_mAP`` are the file's own records (None when absent).
    """

    state_dict: dict[str, torch.Tensor]
    arch: str
    base_width: int
    num_classes: int
    epoch: int | None = None
    best_mAP: float | None = None


def _strip_module(state: dict) -> dict[str, torch.Tensor]:
    return {(k[len("module."):] if k.startswith("module.") else k): v
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_official_state_dict(state: dict) -> bool:
    """True when ``state`` (with or without ``module.``) has the official trunk ``base.*`` and
    the BN neck ``feat_bn.*``."""
    keys = _strip_module(state).keys()
    return any(k.startswith("base.0.") for k in keys) and any(k.startswith("feat_bn.") for k in keys)


def _infer_arch(state: dict[str, torch.Tensor], ibn: bool) -> str:
    """The :data:`ARCHS` entry whose block type, blocks per stage and IBN use fit ``state``."""
    block = Bottleneck if "layer1.0.conv3.weight" in state else BasicBlock
    counts = tuple(len({int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
                   for i in range(1, 5))
    for name, (blk, layers, stem_relu, ibn_layers) in ARCHS.items():
        if blk is block and layers == counts and stem_relu == ibn and bool(ibn_layers) == ibn:
            return name
    kind = "IBN-ResNet-a" if ibn else "ResNet"
    raise NotOfficialCheckpointError(
        f"official checkpoint: a {kind} with {block.__name__} blocks {counts} per stage is not one of "
        f"fastmmt's architectures {sorted(ARCHS)}")


def convert_official_state_dict(state: dict) -> OfficialCheckpoint:
    """Rename the tensors of an official MMT ``state_dict`` to :class:`ReIDNet` keys.

    The trunk layout (plain ResNet or IBN-ResNet-a) is recognised from the keys: only the IBN
    layout has a ``base.7`` (its ReLU shifts the stages by one). Raises
    :class:`NotOfficialCheckpointError` naming what is missing or left over.
    """
    flat = _strip_module(state)
    if not is_official_state_dict(flat):
        sample = sorted(flat)[:4]
        raise NotOfficialCheckpointError(
            "not an official MMT checkpoint: expected keys 'base.0.weight' (conv1), 'base.N.*' (the "
            f"trunk), 'feat_bn.*' and 'classifier.weight', optionally prefixed 'module.'; found {sample}")
    if any(k.startswith("feat.") for k in flat):
        raise NotOfficialCheckpointError(
            "official checkpoint has an embedding layer 'feat.*' (num_features > 0): MMT's models do "
            "not use one and fastmmt's ReIDNet has none")
    ibn = any(k.startswith("base.7.") for k in flat)
    base_map = _IBN_BASE if ibn else _RESNET_BASE
    trunk: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in flat.items():
        m = _BASE_KEY.fullmatch(key)
        head = key.split(".", 1)
        if m and int(m.group(1)) in base_map:
            trunk[f"{base_map[int(m.group(1))]}.{m.group(2)}"] = value
        elif head[0] in _HEAD and len(head) == 2:
            out[f"{_HEAD[head[0]]}.{head[1]}"] = value
        else:
            unused.append(key)
    if unused:
        raise NotOfficialCheckpointError(f"official checkpoint: keys with no place in the network: {unused[:6]}")
    if "conv1.weight" not in trunk or "classifier.weight" not in out:
        raise NotOfficialCheckpointError("official checkpoint without 'base.0.weight' (conv1) or "
                                         "'classifier.weight'")
    arch = _infer_arch(trunk, ibn)
    out.update({f"backbone.{k}": v for k, v in trunk.items()})
    return OfficialCheckpoint(state_dict=out, arch=arch, base_width=int(trunk["conv1.weight"].shape[0]),
                              num_classes=int(out["classifier.weight"].shape[0]))


def is_official_checkpoint(obj: object) -> bool:
    """True for what ``torch.load`` returns from an official release file: ``{"state_dict": ...}``
    or a bare state dict, in the official key layout."""
    if not isinstance(obj, dict):
        return False
    state = obj.get("state_dict", obj)
    return isinstance(state, dict) and is_official_state_dict(state)


def read_official_checkpoint(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read an official release file (``{"state_dict", "epoch", "best_mAP"}`` or a bare state
    dict in the official layout) and convert it (:func:`convert_official_state_dict`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} does not exist")
    return official_checkpoint_from(safe_load(path), path)


def official_checkpoint_from(obj: object, path: str | os.PathLike = "<object>") -> OfficialCheckpoint:
    """:func:`read_official_checkpoint` on an already loaded file's contents (``path`` names it
    in errors)."""
    path = os.fspath(path)
    meta = obj if isinstance(obj, dict) else {}
    state = meta.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise NotOfficialCheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    try:
        ckpt = convert_official_state_dict(state)
    except NotOfficialCheckpointError as e:
        raise NotOfficialCheckpointError(f"{path}: {e}") from None
    if isinstance(meta.get("epoch"), (int, np.integer)):
        ckpt.epoch = int(meta["epoch"])
    if isinstance(meta.get("best_mAP"), (float, int, np.floating)):
        ckpt.best_mAP = float(meta["best_mAP"])
    return ckpt


def load_official_model(path: str | os.PathLike) -> ReIDNet:
    """A :class:`ReIDNet` holding the official release file ``path`` (architecture from the file)."""
    ckpt = read_official_checkpoint(path)
    model = ReIDNet(build_backbone(ckpt.arch, base_width=ckpt.base_width, last_stride=1), ckpt.num_classes)
    load_official_weights(model, ckpt, path)
    return model


def load_official_weights(model: nn.Module, ckpt: OfficialCheckpoint, path: str | os.PathLike = "<object>") -> None:
    """Copy a converted checkpoint into ``model`` (a :class:`ReIDNet` of ``ckpt.arch``, possibly
    with its BN layers replaced by a subclass); a shape or key that does not fit is an error."""
    own = model.state_dict()
    for key, value in ckpt.state_dict.items():
        if key in own and own[key].shape != value.shape:
            raise NotOfficialCheckpointError(f"{os.fspath(path)}: {key!r} has shape {tuple(value.shape)}, "
                                             f"a {ckpt.arch} of width {ckpt.base_width} needs {tuple(own[key].shape)}")
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    # BN batch counters are absent from files written before PyTorch 0.4.1; they change nothing
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise NotOfficialCheckpointError(f"{os.fspath(path)}: missing {missing[:6]}, "
                                         f"unexpected {result.unexpected_keys[:6]}")
