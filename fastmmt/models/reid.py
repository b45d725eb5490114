"""MMT's re-ID network: backbone -> global average pooling -> BN neck -> classifier."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from fastmmt.models.pretrained import LoadReport, load_backbone_weights
from fastmmt.models.resnet import ResNet, build_backbone


class ReIDNet(nn.Module):
    """Backbone + pooled feature ``f`` + BN neck (bias frozen at 0) + bias-free classifier.

    Train mode returns ``(f, logits)`` with ``f`` the pooled pre-BN feature (the triplet losses
    use it) and ``logits = classifier(dropout(bn_neck(f)))``. Eval mode returns
    ``F.normalize(bn_neck(f))``, the retrieval / clustering feature.
    """

    def __init__(self, backbone: ResNet, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = backbone
        self.feat_dim: int = backbone.out_channels
        self.bn_neck = nn.BatchNorm1d(self.feat_dim)
        nn.init.ones_(self.bn_neck.weight)
        nn.init.zeros_(self.bn_neck.bias)
        self.bn_neck.bias.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.pretrained_report: LoadReport | None = None

    @property
    def num_classes(self) -> int:
        """Rows of the classifier (K)."""
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(f, logits)`` in train mode, ``normalize(bn_neck(f))`` in eval mode.

        The pooling and the BN neck run in the network's dtype outside autocast: under
        ``run.amp=bf16`` a float32 network averages the backbone's bf16 map in float32, so the
        triplet, clustering and retrieval features are not rounded to bf16's 8 bits."""
        fmap = self.backbone(x)
        with torch.autocast(fmap.device.type, enabled=False):
            f = fmap.to(self.bn_neck.weight.dtype).mean(dim=(2, 3))  # the network's own dtype
            bn_f = self.bn_neck(f)
        if not self.training:
            return F.normalize(bn_f)
        return f, self.classifier(self.dropout(bn_f))

    def reset_classifier(self, weight: torch.Tensor) -> None:
        """Replace the classifier by one with ``weight.shape[0]`` rows equal to ``weight``.

        MMT does this every epoch with the normalised cluster centroids. The new layer takes
        the device and dtype of the current one; ``weight`` is copied, never aliased.
        """
        if weight.dim() != 2 or weight.shape[1] != self.feat_dim:
            raise ValueError(f"classifier weight must have shape (K, {self.feat_dim}), "
                             f"got {tuple(weight.shape)}")
        old = self.classifier.weight
        new = nn.Linear(self.feat_dim, weight.shape[0], bias=False, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
        new.weight.requires_grad_(old.requires_grad)
        self.classifier = new


def build_model(arch: str, num_classes: int, *, dropout: float = 0.0, pretrained: str | os.PathLike | None = None,
                base_width: int = 64, last_stride: int = 1) -> ReIDNet:
    """A :class:`ReIDNet` on ``arch`` ("resnet18", "resnet34", "resnet50", "resnet101",
    "resnet_ibn50a"). ``pretrained`` is a local ``.pth`` in torchvision or IBN-Net format; the
    load report (missing / unexpected keys) is logged and kept in ``model.pretrained_report``.
    ``base_width`` is the stem width (64 = the standard nets; smaller values give tiny nets for
    CPU demos); ``last_stride`` 1 keeps layer4 at 1/16 resolution (16x8 for 256x128).
    """
    model = ReIDNet(build_backbone(arch, base_width=base_width, last_stride=last_stride),
                    num_classes, dropout=dropout)
    if pretrained is not None:
        model.pretrained_report = load_backbone_weights(model.backbone, pretrained)
    return model
