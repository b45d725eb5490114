"""DBSCAN on (sparse) precomputed distances, and MMT's rule for its radius eps.

Semantics are scikit-learn's ``DBSCAN(metric="precomputed")``: a point's neighbourhood is every
point at distance <= eps, itself included; a point is core when its neighbourhood holds at least
``min_samples`` points; clusters are the connected groups of core points, numbered in the order
of their lowest core index; a non-core point next to a core point joins the lowest-numbered such
cluster; all others are outliers (-1). Labels equal scikit-learn's exactly, not just up to
permutation.
"""
from __future__ import annotations

import numpy as np

from fastmmt.cluster.jaccard import SparseJaccard
from fastmmt.cluster.result import ClusterError

Distances = SparseJaccard | np.ndarray


def _upper_entries(jaccard: Distances) -> tuple[np.ndarray, int]:
    """Stored strict-upper-triangle values and the matrix size N (absent sparse entries are 1)."""
    if isinstance(jaccard, SparseJaccard):
        _check_square(jaccard.num_rows, jaccard.num_cols)
        rows = jaccard.row_ids()
        upper = jaccard.indices > rows
        return jaccard.distances[upper].astype(np.float64), jaccard.num_rows
    m = np.asarray(jaccard)
    if m.ndim != 2:
        raise ClusterError(f"distance matrix must be 2-D, got shape {m.shape}")
    _check_square(*m.shape)
    return m[np.triu_indices(m.shape[0], 1)].astype(np.float64), m.shape[0]


def _check_square(rows: int, cols: int) -> None:
    if rows != cols:
        raise ClusterError(f"pairwise distances must be square (N x N), got {rows} x {cols}")


def dbscan_eps_from_rho(jaccard: Distances, rho: float = 1.6e-3) -> float:
    """MMT's eps: mean of the smallest round(rho * P) positive strict-upper-triangle distances.

    P counts ALL positive upper-triangle entries of the dense N x N matrix: N(N-1)/2 minus the
    zeros. For a :class:`SparseJaccard`, every pair outside the stored support is exactly 1 (the
    largest possible value), so the smallest entries are the stored ones, topped up with 1s when
    round(rho * P) exceeds the stored positive count: the result equals the dense rule exactly.
    """
    if not 0.0 < rho <= 1.0:
        raise ClusterError(f"rho must be in (0, 1], got {rho}")
    vals, n = _upper_entries(jaccard)
    stored_pos = np.sort(vals[vals > 0])
    total_pairs = n * (n - 1) // 2
    if isinstance(jaccard, SparseJaccard):
        positive = total_pairs - int((vals <= 0).sum())
    else:
        positive = stored_pos.size
    top = int(np.round(rho * positive))
    if top == 0:
        raise ClusterError(f"rho={rho} selects no distance: round(rho * P) = 0 with P = {positive} "
                           f"positive pairs among N = {n} points")
    used = stored_pos[:top]
    return float((used.sum() + (top - used.size) * 1.0) / top)


def _edges(jaccard: Distances, eps: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, col) pairs within eps, and N."""
    if isinstance(jaccard, SparseJaccard):
        _check_square(jaccard.num_rows, jaccard.num_cols)
        keep = jaccard.distances <= eps
        return jaccard.row_ids()[keep], jaccard.indices[keep], jaccard.num_rows
    m = np.asarray(jaccard)
    if m.ndim != 2:
        raise ClusterError(f"distance matrix must be 2-D, got shape {m.shape}")
    _check_square(*m.shape)
    r, c = np.nonzero(m <= eps)
    return r, c, m.shape[0]


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per node, the smallest node index of its component (edges u-v, undirected)."""
    parent = np.arange(n)
    while True:
        pu, pv = parent[u], parent[v]
        if np.array_equal(pu, pv):
            return parent
        low = np.minimum(pu, pv)
        np.minimum.at(parent, pu, low)  # hook roots onto smaller roots: parent[x] <= x always
        np.minimum.at(parent, pv, low)
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def dbscan(jaccard: Distances, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN labels (int64, -1 = outlier) from precomputed distances (sparse or dense N x N)."""
    if not np.isfinite(eps) or eps < 0:
        raise ClusterError(f"eps must be a finite non-negative number, got {eps}")
    if min_samples < 1:
        raise ClusterError(f"min_samples must be >= 1, got {min_samples}")
    if isinstance(jaccard, SparseJaccard) and eps >= 1.0:
        # every absent pair (distance 1) is a neighbour: one cluster or nothing
        n = jaccard.num_rows
        return np.full(n, 0 if n >= min_samples else -1, dtype=np.int64)
    r, c, n = _edges(jaccard, eps)
    core = np.bincount(r, minlength=n) >= min_samples
    both = core[r] & core[c] & (r != c)
    root = connected_components(n, r[both], c[both])
    labels = np.full(n, -1, dtype=np.int64)
    roots = np.unique(root[core])
    labels[core] = np.searchsorted(roots, root[core])
    border = core[r] & ~core[c]
    if border.any():
        best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, c[border], labels[r[border]])
        hit = best < np.iinfo(np.int64).max
        labels[hit] = best[hit]
    return labels
