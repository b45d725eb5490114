"""The whole MMT objective for the two students, with each distance matrix computed once."""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastmmt.ops.losses import logits_pair_losses, triplet_pair_losses


class MMTLossOutput(NamedTuple):
    """Total loss and its (un-weighted) terms, each summed over the two students."""

    total: torch.Tensor
    ce: torch.Tensor
    tri: torch.Tensor
    soft_ce: torch.Tensor
    soft_tri: torch.Tensor


def mmt_loss(
    f1: torch.Tensor, f2: torch.Tensor, f1_t: torch.Tensor, f2_t: torch.Tensor,
    p1: torch.Tensor, p2: torch.Tensor, p1_t: torch.Tensor, p2_t: torch.Tensor,
    labels: torch.Tensor, soft_ce_weight: float = 0.5, soft_tri_weight: float = 0.8,
    epsilon: float = 0.1, backend: str = "auto", check_labels: bool = True,
) -> MMTLossOutput:
    """MMT loss with cross supervision (S1 learns from T2, S2 from T1).

    ``total = (1-wce)(CE1+CE2) + (1-wtri)(Tri1+Tri2) + wce(SE(p1,p2_t)+SE(p2,p1_t))
    + wtri(STri(f1,f2_t)+STri(f2,f1_t))``. ``f*`` are pre-BN pooled features, ``p*`` logits,
    ``*_t`` the mean teachers' outputs (detached inside). Each student's distance matrix and
    batch-hard mining are computed once and shared by its hard and soft triplet terms.
    ``check_labels=False``: the caller has checked the label range (see
    :func:`~fastmmt.ops.cross_entropy_label_smooth`).
    """
    ce1, se1 = logits_pair_losses(p1, p2_t, labels, epsilon, backend, check_labels)
    ce2, se2 = logits_pair_losses(p2, p1_t, labels, epsilon, backend, check_labels)
    tri1, stri1 = triplet_pair_losses(f1, f2_t, labels, backend)
    tri2, stri2 = triplet_pair_losses(f2, f1_t, labels, backend)
    ce, tri, se, stri = ce1 + ce2, tri1 + tri2, se1 + se2, stri1 + stri2
    total = (1 - soft_ce_weight) * ce + (1 - soft_tri_weight) * tri + soft_ce_weight * se + soft_tri_weight * stri
    return MMTLossOutput(total, ce, tri, se, stri)
