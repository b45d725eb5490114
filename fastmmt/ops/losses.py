"""Public loss ops with backend dispatch (``auto`` | ``torch`` | ``triton``).

Every op runs with autocast switched off (:func:`~fastmmt.ops._dispatch.float32_region`): it
computes in float32 on any input dtype, inside or outside an autocast region.
"""
from __future__ import annotations

import torch

from fastmmt.ops import reference as ref
from fastmmt.ops._dispatch import float32_region, resolve_backend


def triton_ops():
    """:mod:`fastmmt.ops.triton_ops`, imported on first use: importing triton needs a GPU or the
    interpreter, so the torch backend must not import it."""
    from fastmmt.ops import triton_ops as module

    return module


@float32_region
def cross_entropy_label_smooth(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1, backend: str = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    """Label-smoothed cross-entropy (eps over K classes), mean over the batch.

    ``check_labels=False`` skips the Triton backend's label-range check (a reduction and a host
    read per call) for callers that checked the labels once already; an out-of-range label then
    makes the Triton loss NaN instead of raising. The torch backend's indexing always checks.
    """
    if resolve_backend(backend, logits) == "triton":
        return triton_ops().cross_entropy_label_smooth(logits, labels, epsilon, check_labels=check_labels)
    return ref.cross_entropy_label_smooth(logits, labels, epsilon)


@float32_region
def soft_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Soft cross-entropy of the student against the (detached) teacher's softmax."""
    if resolve_backend(backend, student_logits) == "triton":
        return triton_ops().soft_entropy(student_logits, teacher_logits)
    return ref.soft_entropy(student_logits, teacher_logits)


@float32_region
def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Pairwise Euclidean distances ``sqrt(clamp(|a|^2+|b|^2-2ab, 1e-12))``."""
    if resolve_backend(backend, x) == "triton":
        return triton_ops().pairwise_euclidean(x, y)
    return ref.pairwise_euclidean(x, y)


@float32_region
def softmax_triplet_loss(features: torch.Tensor, labels: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Hard softmax-triplet (margin 0) with batch-hard mining on the features' own distances."""
    if resolve_backend(backend, features) == "triton":
        return triton_ops().softmax_triplet_loss(features, labels)
    return ref.softmax_triplet_loss(features, labels)


@float32_region
def soft_softmax_triplet_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Soft softmax-triplet: teacher distances at the student-mined pairs give the soft target."""
    if resolve_backend(backend, student_features) == "triton":
        return triton_ops().soft_softmax_triplet_loss(student_features, teacher_features, labels)
    return ref.soft_softmax_triplet_loss(student_features, teacher_features, labels)


@float32_region
def triplet_pair_losses(
    student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard, soft) softmax-triplet terms of one student, computed from one distance matrix."""
    if resolve_backend(backend, student_features) == "triton":
        return triton_ops().triplet_pair_losses(student_features, teacher_features, labels)
    return ref.triplet_pair_losses(student_features, teacher_features, labels)


@float32_region
def logits_pair_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    epsilon: float = 0.1, backend: str = "auto", check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed CE, soft entropy) of one student, in one pass over the logits when fused.
    ``check_labels``: as in :func:`cross_entropy_label_smooth`."""
    if resolve_backend(backend, student_logits) == "triton":
        return triton_ops().logits_pair_losses(student_logits, teacher_logits, labels, epsilon, check_labels)
    return ref.logits_pair_losses(student_logits, teacher_logits, labels, epsilon)
