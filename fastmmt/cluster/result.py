"""The clustering result type, its error type and the input checks every clusterer shares."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class ClusterError(ValueError):
    """Clustering cannot run on this input or found nothing usable (the message says why)."""


@dataclass
class ClusterResult:
    """Pseudo-labels of one clustering run.

    ``labels``: int64 (N,), cluster ids ``0..num_clusters-1``, ``-1`` = outlier (DBSCAN only).
    ``centroids``: float32 (num_clusters, D), the MEAN of each cluster's member features (not
    normalised). ``info``: diagnostics (inertia, eps, num_outliers, seconds, ...).
    """

    labels: np.ndarray
    centroids: torch.Tensor
    num_clusters: int
    info: dict = field(default_factory=dict)


def as_feature_tensor(features: torch.Tensor | np.ndarray, what: str = "features") -> torch.Tensor:
    """Check a 2-D, non-empty, finite feature matrix and return it as a CPU/GPU float tensor.

    float64 stays float64 (tests use it for exact references); anything else becomes float32.
    """
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(np.ascontiguousarray(features))
    if not isinstance(features, torch.Tensor):
        raise ClusterError(f"{what} must be a torch.Tensor or numpy array, got {type(features).__name__}")
    if features.dim() != 2:
        raise ClusterError(f"{what} must be 2-D (N, D), got shape {tuple(features.shape)}")
    n, d = features.shape
    if n == 0 or d == 0:
        raise ClusterError(f"{what} is empty: shape {tuple(features.shape)}")
    if features.dtype != torch.float64:
        features = features.float()
    if bool(torch.isfinite(features.sum())):  # one pass: a NaN/inf entry makes the sum NaN/inf
        return features.contiguous()
    bad = (~torch.isfinite(features)).any(dim=1)  # the sum overflowed, or some entries are bad
    num_bad = int(bad.sum())
    if num_bad:
        first = bad.nonzero()[:5, 0].tolist()
        raise ClusterError(f"{what} has NaN/inf values in {num_bad} of {n} rows (first rows: {first})")
    return features.contiguous()


def cluster_means(features: torch.Tensor, labels: np.ndarray, num_clusters: int) -> torch.Tensor:
    """float32 (num_clusters, D) mean feature of each cluster; label -1 (outliers) is ignored."""
    lab = torch.as_tensor(labels, dtype=torch.int64, device=features.device)
    keep = lab >= 0
    sums = torch.zeros(num_clusters, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, lab[keep], features[keep].to(torch.float64))
    counts = torch.bincount(lab[keep], minlength=num_clusters).clamp(min=1).to(torch.float64)
    return (sums / counts[:, None]).to(torch.float32)
