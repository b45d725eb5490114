"""k-reciprocal encoding (Zhong et al., CVPR 2017), computed sparsely from k-NN lists.

Notation follows the paper and its reference code. ``ids`` holds each point's nearest points in
ascending distance, the point itself first. For every point i:
1. R(i, k1): the points j among i's k1+1 nearest that have i among their own k1+1 nearest.
2. Expansion: for each candidate c in R(i, k1), add R(c, round(k1/2)) when more than 2/3 of it
   already lies in R(i, k1) (``3 |R(c) & R(i)| > 2 |R(c)|``, integer arithmetic).
3. V[i, j] = exp(-d(i, j)) / sum over the expanded set, with d the row-normalised distance.
4. Local query expansion: V'[i] = mean of V over i's k2 nearest points (i included).
Every row of V and V' sums to 1. Memory is O(N x k1 x k1/2) in the worst case, never N x N.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from fastmmt.cluster.sparse import CSR, csr_from_blocks, gather_rows

PairDistance = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``f(rows, cols)`` -> row-normalised distances d(rows[p], cols[p]) as float64."""


def check_k(k1: int, k2: int) -> None:
    """k1 >= 1 and 1 <= k2 <= k1 + 1 (query expansion reads the k1+1 nearest neighbours)."""
    if isinstance(k1, bool) or not isinstance(k1, (int, np.integer)) or k1 < 1:
        raise ValueError(f"k1 must be a positive integer, got {k1!r}")
    if isinstance(k2, bool) or not isinstance(k2, (int, np.integer)) or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"k2 must be an integer in [1, k1 + 1] = [1, {k1 + 1}], got {k2!r}")


def half_k(k1: int) -> int:
    """The expansion neighbourhood size, numpy's round-half-to-even of k1/2 like the reference."""
    return int(np.around(k1 / 2.0))


def reciprocal_mask(ids: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """(N, min(k+1, N)) bool: ``ids[i, m]`` is a k-reciprocal neighbour of i."""
    n = ids.shape[0]
    width = min(k + 1, ids.shape[1])
    out = np.empty((n, width), dtype=bool)
    for s in range(0, n, block):
        e = min(s + block, n)
        fwd = ids[s:e, :width]
        back = ids[fwd, :width]  # (B, width, width)
        out[s:e] = (back == np.arange(s, e)[:, None, None]).any(axis=2)
    return out


def _expanded_sets(ids: np.ndarray, r1: np.ndarray, rh: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expanded k-reciprocal set of each row in ``rows``: sorted ids (B, W) and a validity mask."""
    n = ids.shape[0]
    k_w, h_w = r1.shape[1], rh.shape[1]
    cand = ids[rows, :k_w]
    cmask = r1[rows]
    members = np.where(cmask, cand, -1)  # R(i, k1), -1 = not a member
    half = ids[cand, :h_w]  # (B, K, Kh): the k1/2 neighbours of each candidate
    hmask = rh[cand]  # which of them are in R(c, k1/2)
    inside = (half[..., None] == members[:, None, None, :]).any(axis=3) & hmask
    accept = cmask & (3 * inside.sum(axis=2) > 2 * hmask.sum(axis=2))
    added = np.where(hmask & accept[..., None], half, -1).reshape(len(rows), -1)
    allids = np.concatenate([members, added], axis=1)
    allids = np.where(allids < 0, n, allids)
    allids.sort(axis=1)
    keep = allids < n
    keep[:, 1:] &= allids[:, 1:] != allids[:, :-1]
    return allids, keep


def encode(ids: np.ndarray, pair_distance: PairDistance, k1: int, *, block: int = 2048,
           progress: bool = False) -> CSR:
    """Sparse V: Gaussian-kernel weights over each point's expanded k-reciprocal set."""
    n = ids.shape[0]
    r1 = reciprocal_mask(ids, k1)
    rh = reciprocal_mask(ids, half_k(k1))
    blocks = []
    for s in tqdm(range(0, n, block), desc="k-reciprocal sets", disable=not progress, leave=False):
        rows = np.arange(s, min(s + block, n))
        allids, keep = _expanded_sets(ids, r1, rh, rows)
        counts = keep.sum(axis=1)
        row_of = np.repeat(rows, counts)
        cols = allids[keep]  # row-major: each row's ids ascending
        w = np.exp(-pair_distance(row_of, cols))
        total = np.bincount(np.repeat(np.arange(len(rows)), counts), weights=w, minlength=len(rows))
        blocks.append((counts, cols, w / np.repeat(total, counts)))
    return csr_from_blocks(blocks, (n, n))


def query_expand(v: CSR, ids: np.ndarray, k2: int, *, block: int = 2048, progress: bool = False) -> CSR:
    """V'[i] = mean of V's rows over i's k2 nearest points (themselves included)."""
    n = v.shape[0]
    k2 = min(k2, ids.shape[1])
    if k2 == 1 and np.array_equal(ids[:, 0], np.arange(n)):
        return v
    blocks = []
    for s in tqdm(range(0, n, block), desc="query expansion", disable=not progress, leave=False):
        e = min(s + block, n)
        owner, cols, vals = gather_rows(v, ids[s:e, :k2].reshape(-1))
        key = (owner // k2) * n + cols
        uniq, inv = np.unique(key, return_inverse=True)
        sums = np.bincount(inv, weights=vals) / k2
        counts = np.bincount(uniq // n, minlength=e - s)
        blocks.append((counts, uniq % n, sums))
    return csr_from_blocks(blocks, (n, n))
