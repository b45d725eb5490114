"""Plain-torch reference implementations of MMT's losses (the exact functions the kernels match).

Conventions shared by every backend:
- Computation is in float32 (float64 inputs stay float64); losses are returned as 0-d tensors.
- ``pairwise_euclidean``: ``sqrt(clamp(|a|^2 + |b|^2 - 2ab, min=1e-12))``. For the self-distance
  matrix (``y is None``) the diagonal is exactly ``sqrt(1e-12)`` with zero gradient: mathematically
  |a|^2 + |a|^2 - 2aa = 0, and rounding noise there would otherwise give huge, backend-dependent
  gradients through the sqrt.
- Batch-hard mining: hardest positive = argmax distance over same-label columns (the anchor itself
  included), hardest negative = argmin over other labels; ties go to the LOWEST column index.
  A row with no negative (one identity in the batch) contributes 0 to the triplet terms and still
  counts in the mean over rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

EPS_SQ = 1e-12


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cross_entropy_label_smooth(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1,
                               num_classes: int | None = None) -> torch.Tensor:
    """Label-smoothed cross-entropy: targets (1 - eps) one-hot + eps / C, mean over rows
    (C = ``num_classes``, by default the K columns)."""
    logp = F.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
    c = logits.shape[1] if num_classes is None else num_classes
    nll = -logp.gather(1, labels.view(-1, 1)).squeeze(1)
    return ((1.0 - epsilon) * nll - (epsilon / c) * logp.sum(1)).mean()


def logits_pair_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed CE, soft entropy) of one student sharing one log-softmax; the same values
    as :func:`cross_entropy_label_smooth` and :func:`soft_entropy`."""
    dt = _compute_dtype(student_logits)
    logp = F.log_softmax(student_logits.to(dt), dim=1)
    k = student_logits.shape[1]
    nll = -logp.gather(1, labels.view(-1, 1)).squeeze(1)
    ce = ((1.0 - epsilon) * nll - (epsilon / k) * logp.sum(1)).mean()
    target = F.softmax(teacher_logits.detach().to(dt), dim=1)
    return ce, (-target * logp).sum(1).mean()


def soft_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_c -softmax(teacher)_ic * log_softmax(student)_ic``; teacher detached."""
    dt = _compute_dtype(student_logits)
    target = F.softmax(teacher_logits.detach().to(dt), dim=1)
    return (-target * F.log_softmax(student_logits.to(dt), dim=1)).sum(1).mean()


def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances between the rows of x and y (y = x when None), spec's clamp and sqrt."""
    dt = _compute_dtype(x)
    xs = x.to(dt)
    sq_x = xs.pow(2).sum(1)
    ys = xs if y is None else y.to(dt)
    sq_y = sq_x if y is None else ys.pow(2).sum(1)
    # 2 * (x @ y^T) scales the N x N product (exactly), not the N x D input: same values, less work.
    d2 = sq_x.unsqueeze(1) + sq_y.unsqueeze(0) - 2.0 * (xs @ ys.t())
    if y is None:
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        d2 = d2.masked_fill(eye, 0.0)
    return d2.clamp(min=EPS_SQ).sqrt()


class Mining(NamedTuple):
    """Batch-hard mining result: per-row column indices and whether a negative exists."""

    ap_idx: torch.Tensor
    an_idx: torch.Tensor
    has_neg: torch.Tensor


def batch_hard_mining(dist: torch.Tensor, labels: torch.Tensor) -> Mining:
    """Hardest positive (self included) and hardest negative per row; ties -> lowest index."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    with torch.no_grad():
        ap_idx = dist.masked_fill(~same, float("-inf")).argmax(1)
        an_idx = dist.masked_fill(same, float("inf")).argmin(1)
        has_neg = (~same).any(1)
    return Mining(ap_idx, an_idx, has_neg)


def _pair_distance(a: torch.Tensor, b: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor,
                   same_row: torch.Tensor) -> torch.Tensor:
    """Row-wise spec distance ||a_i - b_i|| from the rows and their squared norms, exactly
    sqrt(1e-12) where ``same_row``."""
    d2 = sq_a + sq_b - 2.0 * (a * b).sum(1)
    return d2.masked_fill(same_row, 0.0).clamp(min=EPS_SQ).sqrt()


def _hard_term(d_ap: torch.Tensor, d_an: torch.Tensor, has_neg: torch.Tensor) -> torch.Tensor:
    # -log softmax([d_ap, d_an])[1] == softplus(d_ap - d_an). Rows without a negative have a
    # finite placeholder d_an (column 0) and are masked to 0, which also zeroes their gradient.
    return torch.where(has_neg, F.softplus(d_ap - d_an), torch.zeros_like(d_ap)).mean()


def _soft_term(d_ap, d_an, t_ap, t_an, has_neg) -> torch.Tensor:
    target = F.softmax(torch.stack((t_ap, t_an), 1).detach(), dim=1)
    logp = F.log_softmax(torch.stack((d_ap, d_an), 1), dim=1)
    per_row = (-target * logp).sum(1)
    return torch.where(has_neg, per_row, torch.zeros_like(per_row)).mean()


def _mined_student(dist: torch.Tensor, m: Mining) -> tuple[torch.Tensor, torch.Tensor]:
    return dist.gather(1, m.ap_idx.view(-1, 1)).squeeze(1), dist.gather(1, m.an_idx.view(-1, 1)).squeeze(1)


def mined_pair_distances(x: torch.Tensor, m: Mining) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_ap, d_an): the rows' distances to their mined partners only (2 per row, O(N D)), the same
    values and gradient as the distance matrix's entries there (diagonal exactly sqrt(1e-12))."""
    t = x.to(_compute_dtype(x))
    rows = torch.arange(t.shape[0], device=t.device)
    sq = t.pow(2).sum(1)
    # index_select copies whole rows (advanced indexing gathers element by element on CPU)
    d_ap = _pair_distance(t, t.index_select(0, m.ap_idx), sq, sq[m.ap_idx], m.ap_idx == rows)
    d_an = _pair_distance(t, t.index_select(0, m.an_idx), sq, sq[m.an_idx], m.an_idx == rows)
    return d_ap, d_an


def teacher_pair_distances(teacher: torch.Tensor, m: Mining) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher distances at the student's mined pairs only (2 per row), detached."""
    return mined_pair_distances(teacher.detach(), m)


def softmax_triplet_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard softmax-triplet, margin 0: ``mean_i softplus(d_ap_i - d_an_i)`` with batch-hard mining."""
    dist = pairwise_euclidean(features)
    m = batch_hard_mining(dist, labels)
    d_ap, d_an = _mined_student(dist, m)
    return _hard_term(d_ap, d_an, m.has_neg)


def soft_softmax_triplet_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Soft softmax-triplet: student log-softmax of [d_ap, d_an] against the teacher's softmax
    of its distances at the same (student-mined) pairs."""
    dist = pairwise_euclidean(student_features)
    m = batch_hard_mining(dist, labels)
    d_ap, d_an = _mined_student(dist, m)
    t_ap, t_an = teacher_pair_distances(teacher_features, m)
    return _soft_term(d_ap, d_an, t_ap, t_an, m.has_neg)


def triplet_pair_losses(
    student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard, soft) softmax-triplet terms sharing one distance matrix and one mining."""
    dist = pairwise_euclidean(student_features)
    m = batch_hard_mining(dist, labels)
    d_ap, d_an = _mined_student(dist, m)
    t_ap, t_an = teacher_pair_distances(teacher_features, m)
    return _hard_term(d_ap, d_an, m.has_neg), _soft_term(d_ap, d_an, t_ap, t_an, m.has_neg)
