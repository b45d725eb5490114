"""``ClusterMemory`` (Cluster Contrast) and ``HybridMemory`` (SpCL) with the originals' constructors,
buffers and calls, so a training script swaps them in by changing its import line."""
from __future__ import annotations

import torch
from torch import nn

from fastmmt.ops.memory import cluster_memory_loss, hybrid_memory_loss


class ClusterMemory(nn.Module):
    """Cluster-level memory: ``features`` (num_samples clusters x num_features) holds normalised
    centroids (the training script fills it after each clustering); ``forward(inputs, targets)``
    returns the loss, and its backward updates the centroids (see :func:`cluster_memory_loss`)."""

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 use_hard: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.num_features, self.num_samples = num_features, num_samples
        self.momentum, self.temp, self.use_hard, self.backend = momentum, temp, use_hard, backend
        self.register_buffer("features", torch.zeros(num_samples, num_features))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cluster_memory_loss(inputs, targets, self.features, self.temp, self.momentum, self.use_hard,
                                   self.backend)


class HybridMemory(nn.Module):
    """SpCL's hybrid memory: ``features`` (num_samples memory rows: source class centroids, then target
    instances) with their ``labels``; ``forward(inputs, indexes)`` returns the loss over the labels,
    and its backward updates rows ``indexes`` (see :func:`hybrid_memory_loss`)."""

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05, momentum: float = 0.2,
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_features, self.num_samples = num_features, num_samples
        self.momentum, self.temp, self.backend = momentum, temp, backend
        self.register_buffer("features", torch.zeros(num_samples, num_features))
        self.register_buffer("labels", torch.zeros(num_samples, dtype=torch.long))

    def forward(self, inputs: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
        return hybrid_memory_loss(inputs, indexes, self.features, self.labels, self.temp, self.momentum,
                                  self.backend)
