"""``nn.Module`` wrappers of the functional ops (stateless; they hold only options)."""
from __future__ import annotations

import torch
from torch import nn

from fastmmt.ops import losses
from fastmmt.ops.mmt_loss import MMTLossOutput, mmt_loss


class CrossEntropyLabelSmooth(nn.Module):
    """Label-smoothed cross-entropy (``epsilon`` over K classes)."""

    def __init__(self, epsilon: float = 0.1, backend: str = "auto") -> None:
        super().__init__()
        self.epsilon, self.backend = epsilon, backend

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.cross_entropy_label_smooth(logits, labels, self.epsilon, self.backend)


class SoftEntropy(nn.Module):
    """Soft cross-entropy against a detached teacher's softmax."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return losses.soft_entropy(student_logits, teacher_logits, self.backend)


class SoftmaxTripletLoss(nn.Module):
    """Hard softmax-triplet loss, margin 0, batch-hard mining."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.softmax_triplet_loss(features, labels, self.backend)


class SoftSoftmaxTripletLoss(nn.Module):
    """Soft softmax-triplet loss with the teacher's distances as the soft target."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.soft_softmax_triplet_loss(student_features, teacher_features, labels, self.backend)


class MMTLoss(nn.Module):
    """The full MMT objective (see :func:`fastmmt.ops.mmt_loss`)."""

    def __init__(self, soft_ce_weight: float = 0.5, soft_tri_weight: float = 0.8, epsilon: float = 0.1,
                 backend: str = "auto") -> None:
        super().__init__()
        self.soft_ce_weight, self.soft_tri_weight = soft_ce_weight, soft_tri_weight
        self.epsilon, self.backend = epsilon, backend

    def forward(self, f1, f2, f1_t, f2_t, p1, p2, p1_t, p2_t, labels) -> MMTLossOutput:
        return mmt_loss(f1, f2, f1_t, f2_t, p1, p2, p1_t, p2_t, labels, self.soft_ce_weight,
                        self.soft_tri_weight, self.epsilon, self.backend)
