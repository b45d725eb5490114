"""The MMT objective as an ``nn.Module`` (stateless; it holds only options).

The single-term loss modules are those of :mod:`fastmmt.ops.compat`, with the constructors and
calls of MMT's own classes (what re-ID code expects); fastmmt-style calls are the functions."""
from __future__ import annotations

from torch import nn

from fastmmt.ops.mmt_loss import MMTLossOutput, mmt_loss


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
