"""Squared Euclidean distances between feature sets, the re-ID retrieval distance."""
from __future__ import annotations

import torch


def pairwise_sq_euclidean(qf: torch.Tensor, gf: torch.Tensor) -> torch.Tensor:
    """``|q|^2 + |g|^2 - 2 q.g`` for every (query row, gallery row), shape (Q, G).

    For L2-normalised features this is ``2 - 2 cos``, so the ranking equals cosine ranking.
    Like the reference MMT code it is not clamped at 0 (rounding can leave tiny negatives for
    near-duplicates; clamping would turn them into ties). Rows are independent, so calling it
    on slices of ``qf`` gives the rows of the full matrix (chunk it to bound memory). Computed
    in float32 (float64 inputs stay float64) on the device of ``qf``.
    """
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D) with the same D, got "
                         f"{tuple(qf.shape)} and {tuple(gf.shape)}")
    dt = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32
    q = qf.to(dt)
    g = gf.to(device=qf.device, dtype=dt)
    dist = q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1).unsqueeze(0)
    return dist.addmm_(q, g.t(), alpha=-2.0)
