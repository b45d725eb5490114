"""Public loss ops with backend dispatch (``auto`` | ``torch`` | ``triton``)."""
from __future__ import annotations

import torch

from fastmmt.ops import reference as ref
from fastmmt.ops._dispatch import resolve_backend


def _triton():
    from fastmmt.ops import triton_ops  # lazy: importing triton needs a GPU or the interpreter

    return triton_ops


def cross_entropy_label_smooth(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1, backend: str = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    """Label-smoothed cross-entropy (eps over K classes), mean over the batch.

    ``check_labels=False`` skips the Triton backend's label-range check (a reduction and a host
    read per call) for callers that checked the labels once already; an out-of-range label then
    gives undefined results instead of an error. The torch backend's indexing always checks.
    """
    if resolve_backend(backend, logits) == "triton":
        return _triton().cross_entropy_label_smooth(logits, labels, epsilon, check_labels)
    return ref.cross_entropy_label_smooth(logits, labels, epsilon)


def soft_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Soft cross-entropy of the student against the (detached) teacher's softmax."""
    if resolve_backend(backend, student_logits) == "triton":
        return _triton().soft_entropy(student_logits, teacher_logits)
    return ref.soft_entropy(student_logits, teacher_logits)


def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Pairwise Euclidean distances ``sqrt(clamp(|a|^2+|b|^2-2ab, 1e-12))``."""
    if resolve_backend(backend, x) == "triton":
        return _triton().pairwise_euclidean(x, y)
    return ref.pairwise_euclidean(x, y)


def softmax_triplet_loss(features: torch.Tensor, labels: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Hard softmax-triplet (margin 0) with batch-hard mining on the features' own distances."""
    if resolve_backend(backend, features) == "triton":
        return _triton().softmax_triplet_loss(features, labels)
    return ref.softmax_triplet_loss(features, labels)


def soft_softmax_triplet_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Soft softmax-triplet: teacher distances at the student-mined pairs give the soft target."""
    if resolve_backend(backend, student_features) == "triton":
        return _triton().soft_softmax_triplet_loss(student_features, teacher_features, labels)
    return ref.soft_softmax_triplet_loss(student_features, teacher_features, labels)


def triplet_pair_losses(
    student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard, soft) softmax-triplet terms of one student, computed from one distance matrix."""
    if resolve_backend(backend, student_features) == "triton":
        return _triton().triplet_pair_losses(student_features, teacher_features, labels)
    return ref.triplet_pair_losses(student_features, teacher_features, labels)


def logits_pair_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    epsilon: float = 0.1, backend: str = "auto", check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed CE, soft entropy) of one student, in one pass over the logits when fused.
    ``check_labels``: as in :func:`cross_entropy_label_smooth`."""
    if resolve_backend(backend, student_logits) == "triton":
        return _triton().logits_pair_losses(student_logits, teacher_logits, labels, epsilon, check_labels)
    return ref.logits_pair_losses(student_logits, teacher_logits, labels, epsilon)
