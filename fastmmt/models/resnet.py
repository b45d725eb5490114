"""ResNet and IBN-ResNet-a backbones, written without torchvision.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) and IBN-Net
(``layer1.0.bn1.IN`` / ``layer1.0.bn1.BN``) so their ImageNet state dicts load key for key.
The backbone ends at ``layer4`` (no pooling, no ``fc``): :class:`fastmmt.models.ReIDNet` pools.
"""
from __future__ import annotations

from typing import Type, Union

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class IBN(nn.Module):
    """IBN-Net "a" normalisation: InstanceNorm(affine) on the first half, BatchNorm on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(a), self.BN(b)), dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); the stride sits on the first one."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, ibn: bool = False) -> None:
        super().__init__()
        if ibn:
            raise ValueError("IBN-a is defined for Bottleneck blocks only")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, torchvision "v1.5") -> 1x1 x4; ``ibn`` splits ``bn1`` (IBN-a)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, ibn: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = IBN(planes) if ibn else nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """ResNet trunk ``conv1 -> bn1 -> [relu] -> maxpool -> layer1..4`` returning the feature map.

    ``stem_relu`` is False for the plain ResNets (MMT's reference drops the stem ReLU) and True
    for IBN-ResNet-a. ``ibn_layers`` lists the stages (1-based) whose bottlenecks use IBN-a.
    ``base_width`` is the stem width; stage ``i`` has ``base_width * 2**(i-1)`` planes.
    """

    def __init__(self, block: Block, layers: tuple[int, int, int, int], *, base_width: int = 64,
                 last_stride: int = 1, stem_relu: bool = False,
                 ibn_layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        if base_width < 2:
            raise ValueError(f"base_width must be >= 2, got {base_width}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides = (1, 2, 2, last_stride)
        for i, (n, stride) in enumerate(zip(layers, strides), start=1):
            stage = self._make_layer(block, base_width * 2 ** (i - 1), n, stride, i in ibn_layers)
            setattr(self, f"layer{i}", stage)
        self.out_channels = self.inplanes
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int,
                    ibn: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, ibn)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, ibn) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


ARCHS: dict[str, tuple[Block, tuple[int, int, int, int], bool, tuple[int, ...]]] = {
    # name: (block, blocks per stage, stem ReLU, IBN stages)
    "resnet18": (BasicBlock, (2, 2, 2, 2), False, ()),
    "resnet34": (BasicBlock, (3, 4, 6, 3), False, ()),
    "resnet50": (Bottleneck, (3, 4, 6, 3), False, ()),
    "resnet101": (Bottleneck, (3, 4, 23, 3), False, ()),
    "resnet_ibn50a": (Bottleneck, (3, 4, 6, 3), True, (1, 2, 3)),
}


def build_backbone(arch: str, *, base_width: int = 64, last_stride: int = 1) -> ResNet:
    """The ResNet trunk named ``arch`` (one of :data:`ARCHS`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    block, layers, stem_relu, ibn_layers = ARCHS[arch]
    return ResNet(block, layers, base_width=base_width, last_stride=last_stride,
                  stem_relu=stem_relu, ibn_layers=ibn_layers)
