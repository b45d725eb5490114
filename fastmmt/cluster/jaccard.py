"""k-reciprocal Jaccard distance between points, stored sparsely.

Jaccard(i, j) = 1 - sum_k min(V'_ik, V'_jk) / sum_k max(V'_ik, V'_jk) over the k-reciprocal
encoding V' (:mod:`fastmmt.cluster.encoding`); negative rounding noise is clipped to 0. Two
points whose encodings share no column are at distance exactly 1, so only pairs that share a
column are stored: memory is linear in N (a few hundred entries per row at k1 = 20), never N x N.

Values below ``ZERO_TOL`` (1e-6) are set to exactly 0: they arise only from points whose
encodings are equal in exact arithmetic (e.g. the same k2 nearest neighbours), where rounding
leaves +-1e-16 noise. Without this, MMT's eps rule (which counts only POSITIVE distances) would
flip with the summation order, changing eps by ~0.4% between mathematically equal inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fastmmt.cluster._threads import limited_threads
from fastmmt.cluster.encoding import PairDistance, check_k, encode, query_expand
from fastmmt.cluster.knn import Neighbours, knn, pair_sq_distances, sq_norms
from fastmmt.cluster.result import ClusterError, as_feature_tensor
from fastmmt.cluster.sparse import CSR, gather_rows, ragged_positions


ZERO_TOL = 1e-6


@dataclass
class SparseJaccard:
    """Jaccard distances by row: row r's stored neighbours are ``indices[indptr[r]:indptr[r+1]]``
    (ascending ids, the point itself included at distance 0) with ``distances`` at the same
    positions; every pair NOT stored has distance exactly 1."""

    indptr: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    num_cols: int

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored neighbour ids and distances of row ``r``."""
        a, b = self.indptr[r], self.indptr[r + 1]
        return self.indices[a:b], self.distances[a:b]

    def row_ids(self) -> np.ndarray:
        """Row index of every stored entry (same order as ``indices``)."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), np.diff(self.indptr))

    def to_dense(self) -> np.ndarray:
        """The full (rows, cols) float32 matrix, 1 outside the stored support. O(N^2) memory."""
        out = np.ones((self.num_rows, self.num_cols), dtype=np.float32)
        out[self.row_ids(), self.indices] = self.distances
        return out


def jaccard_rows(v: CSR, num_rows: int, *, block_elems: int = 400_000, unit_rows: bool = False,
                 zero_tol: float = ZERO_TOL, progress: bool = False) -> SparseJaccard:
    """Jaccard distances from each of the first ``num_rows`` points to every point, over ``v``.

    The distance is symmetric: a pair of two such points is evaluated once, in the row of the
    lower id, and mirrored (so the result is exactly symmetric there). Rows go in blocks whose
    dense accumulator (rows x N float64) holds about ``block_elems`` entries: small enough to
    stay in cache (bench/RESULTS.md has the block sizes tried). ``unit_rows``: take every row sum
    of ``v`` as exactly 1, so the union is ``2 - sum(min)`` (the re-ranking code of SpCL and Cluster
    Contrast); distances below ``zero_tol`` become 0."""
    n = v.shape[1]
    vt, in_vt = v.transpose_with_positions()
    if unit_rows:
        rowsum = np.ones(n)
    else:
        rowsum = np.bincount(np.repeat(np.arange(n), np.diff(v.indptr)), weights=v.data, minlength=n)
    block = max(1, block_elems // max(n, 1))
    rows_u, cols_u, dist_u = [], [], []
    for s in tqdm(range(0, num_rows, block), desc="Jaccard", disable=not progress, leave=False):
        e = min(s + block, num_rows)
        owner, col, vi = gather_rows(v, np.arange(s, e))
        # the points j >= the row's own id that share column `col`: vt's row `col` (ascending
        # ids) from the row's own entry on
        start = in_vt[v.indptr[s]:v.indptr[e]]
        lengths = vt.indptr[col + 1] - start
        pos = ragged_positions(start, lengths)
        entry = np.repeat(np.arange(len(col)), lengths)
        width = n - s
        key = owner[entry] * width + (vt.indices[pos] - s)
        smin = np.bincount(key, weights=np.minimum(vi[entry], vt.data[pos]), minlength=(e - s) * width)
        rr, cc = np.divmod(np.flatnonzero(smin > 0), width)
        s_val = smin[rr * width + cc]
        rr += s
        cc += s
        dist = 1.0 - s_val / (rowsum[rr] + rowsum[cc] - s_val)
        dist[dist < zero_tol] = 0.0
        rows_u.append(rr)
        cols_u.append(cc)
        dist_u.append(dist.astype(np.float32))
    return _with_mirror(_cat(rows_u, np.int64), _cat(cols_u, np.int64), _cat(dist_u, np.float32),
                        num_rows, n)


def _with_mirror(rows: np.ndarray, cols: np.ndarray, dist: np.ndarray, num_rows: int,
                 n: int) -> SparseJaccard:
    """CSR rows from the pairs (row, col >= row) in row-major order plus their mirrors
    (col, row) for cols < num_rows: a row's mirrored entries (ids below it) come first."""
    low = (cols > rows) & (cols < num_rows)
    order = np.argsort(cols[low], kind="stable")  # by new row; old rows stay ascending within
    rows_l, cols_l, dist_l = cols[low][order], rows[low][order], dist[low][order]
    count_l = np.bincount(rows_l, minlength=num_rows)
    count_u = np.bincount(rows, minlength=num_rows)
    indptr = np.concatenate([[0], np.cumsum(count_l + count_u)]).astype(np.int64)
    pos_l = indptr[rows_l] + np.arange(len(rows_l)) - (np.cumsum(count_l) - count_l)[rows_l]
    pos_u = indptr[rows] + count_l[rows] + np.arange(len(rows)) - (np.cumsum(count_u) - count_u)[rows]
    indices = np.empty(indptr[-1], dtype=np.int64)
    distances = np.empty(indptr[-1], dtype=np.float32)
    indices[pos_l], distances[pos_l] = cols_l, dist_l
    indices[pos_u], distances[pos_u] = cols, dist
    return SparseJaccard(indptr, indices, distances, n)


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def feature_pair_distance(x: torch.Tensor, nb: Neighbours) -> PairDistance:
    """Row-normalised squared Euclidean distance between feature rows, pair by pair.

    Pairs found in the k-NN lists reuse the distance already computed there (most of them);
    the others (about 1 in 8 at k1 = 20) are computed from the features.
    """
    norms = sq_norms(x)
    scale = np.where(nb.row_max > 0, nb.row_max, 1.0)

    def dist(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        hit = nb.ids[rows] == cols[:, None]
        found = hit.any(axis=1)
        out = np.where(found, nb.dist[rows, hit.argmax(axis=1)], 0.0)
        miss = np.nonzero(~found)[0]
        out[miss] = pair_sq_distances(x, norms, rows[miss], cols[miss])
        return out / scale[rows]

    return dist


def k_reciprocal_jaccard(
    features: torch.Tensor | np.ndarray,
    k1: int = 20,
    k2: int = 6,
    *,
    dense: bool = False,
    index: str = "flat",
    num_threads: int | None = None,
    progress: bool = False,
) -> SparseJaccard | np.ndarray:
    """Pairwise k-reciprocal Jaccard distances of the rows of ``features`` (N, D).

    The base distance is squared Euclidean divided by its row maximum, as in the reference
    implementation (for L2-normalised features it ranks like cosine). ``index``: ``"flat"``
    (exact, default) or ``"hnsw"`` (approximate neighbours for very large N). ``dense=True``
    returns the N x N float32 matrix (small N only: testing, comparison).
    """
    x = as_feature_tensor(features)
    try:
        check_k(k1, k2)
    except ValueError as err:
        raise ClusterError(str(err)) from None
    n = x.shape[0]
    with limited_threads(num_threads), torch.no_grad():
        nb = knn(x, min(k1 + 1, n), index=index, progress=progress)
        v = encode(nb.ids, feature_pair_distance(x, nb), k1, progress=progress)
        v = query_expand(v, nb.ids, k2, progress=progress)
        jac = jaccard_rows(v, n, progress=progress)
    return jac.to_dense() if dense else jac
