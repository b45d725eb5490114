"""Official MMT release files (``*.pth.tar``): conversion to ReIDNet keeps the features.

The files are built here in the official key layout WITHOUT the converter: a module laid out as
the official network (``base`` = ``nn.Sequential`` of the trunk's modules in the official order,
then ``feat_bn`` and ``classifier``), wrapped as DataParallel's ``module``, gives the keys by
PyTorch's own naming. Its forward is the official one (base -> global average pooling -> feat_bn
-> normalise in eval mode), so the converted model must give its features.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmmt.models import build_model
from fastmmt.models.official import (NotOfficialCheckpointError, convert_official_state_dict, load_official_model,
                                     read_official_checkpoint)


class _OfficialLayout(nn.Module):
    """The official network's module tree, sharing the tensors of a fastmmt model."""

    def __init__(self, model, ibn: bool) -> None:
        super().__init__()
        b = model.backbone
        stem = [b.conv1, b.bn1, nn.ReLU(), nn.MaxPool2d(3, 2, 1)] if ibn else [b.conv1, b.bn1, nn.MaxPool2d(3, 2, 1)]
        self.base = nn.Sequential(*stem, b.layer1, b.layer2, b.layer3, b.layer4)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.feat_bn = model.bn_neck
        self.classifier = model.classifier

    def forward(self, x):
        bn_x = self.feat_bn(self.gap(self.base(x)).flatten(1))
        return F.normalize(bn_x)


class _DataParallelLike(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-trivial values in every tensor (BN statistics too), so a misplaced key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                r = torch.rand(t.shape, generator=g, dtype=t.dtype)
                t.copy_(0.5 + r if ("running_var" in name or name.endswith("bn1.weight")) else r - 0.5)


def _official_file(tmp_path, arch: str, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    src = build_model(arch, num_classes, base_width=8)
    _randomise(src, seed)
    official = _OfficialLayout(src, ibn=arch == "resnet_ibn50a")
    state = _DataParallelLike(official).state_dict()
    path = tmp_path / f"{arch}_model_best.pth.tar"
    torch.save({"state_dict": state, "epoch": 79, "best_mAP": np.float64(0.318)}, path)
    return path, official.eval(), state


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(5))


def test_hand_built_layout_is_the_published_one(tmp_path):
    _, _, state = _official_file(tmp_path, "resnet50", 11)
    for key in ("module.base.0.weight", "module.base.1.running_var", "module.base.3.0.conv1.weight",
                "module.base.6.2.bn3.weight", "module.feat_bn.weight", "module.classifier.weight"):
        assert key in state, key
    assert not any(k.startswith("module.base.2.") or k.startswith("module.base.7.") for k in state)
    assert "module.classifier.bias" not in state
    _, _, state = _official_file(tmp_path, "resnet_ibn50a", 11)
    for key in ("module.base.0.weight", "module.base.1.weight", "module.base.4.0.bn1.IN.weight",
                "module.base.6.5.bn1.BN.running_mean", "module.base.7.2.conv3.weight"):
        assert key in state, key
    assert not any(k.startswith(("module.base.2.", "module.base.3.")) for k in state)


@pytest.mark.parametrize("arch", ["resnet50", "resnet_ibn50a"])
def test_converted_model_gives_the_same_features(tmp_path, arch):
    path, official, _ = _official_file(tmp_path, arch, 13)
    ckpt = read_official_checkpoint(path)
    assert (ckpt.arch, ckpt.base_width, ckpt.num_classes, ckpt.epoch) == (arch, 8, 13, 79)
    assert ckpt.best_mAP == pytest.approx(0.318)
    model = load_official_model(path).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=0, atol=0)
    # the classifier rows come across too (no bias in either)
    torch.testing.assert_close(model.classifier.weight, official.classifier.weight, rtol=0, atol=0)


def test_dbscan_release_classifier_one_row_per_training_image(tmp_path):
    path, official, _ = _official_file(tmp_path, "resnet50", 1000)  # e.g. one row per target image
    model = load_official_model(path).eval()
    assert model.num_classes == 1000
    with torch.no_grad():
        torch.testing.assert_close(model(_x(2)), official(_x(2)), rtol=0, atol=0)


def test_bare_state_dict_without_module_prefix(tmp_path):
    _, official, _ = _official_file(tmp_path, "resnet50", 7)
    path = tmp_path / "bare.pth"
    torch.save(official.state_dict(), path)  # no wrapper, no module. prefix
    model = load_official_model(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), official(_x()), rtol=0, atol=0)
    assert read_official_checkpoint(path).epoch is None


def test_files_in_neither_format_are_clear_errors(tmp_path):
    fastmmt_file = tmp_path / "model.pt"
    torch.save(build_model("resnet18", 3, base_width=8).state_dict(), fastmmt_file)
    with pytest.raises(NotOfficialCheckpointError, match=r"model\.pt: not an official MMT checkpoint.*base\.0"):
        read_official_checkpoint(fastmmt_file)
    with pytest.raises(FileNotFoundError, match="missing.pth.tar"):
        read_official_checkpoint(tmp_path / "missing.pth.tar")
    _, _, state = _official_file(tmp_path, "resnet50", 5)
    extra = dict(state, **{"module.feat.weight": torch.zeros(4, 4)})
    with pytest.raises(NotOfficialCheckpointError, match="embedding layer"):
        convert_official_state_dict(extra)
    extra = dict(state, **{"module.base.9.weight": torch.zeros(4)})
    with pytest.raises(NotOfficialCheckpointError, match=r"no place.*base\.9"):
        convert_official_state_dict(extra)
    wrong = dict(state)
    wrong["module.base.3.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    bad = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": wrong}, bad)
    with pytest.raises(NotOfficialCheckpointError, match=r"layer1\.0\.conv1\.weight"):
        load_official_model(bad)
