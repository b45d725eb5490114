"""k nearest neighbours under squared Euclidean distance, plus each row's largest distance.

The k-reciprocal encoding needs, per point, its k1+1 nearest points (itself first) and the
largest distance in its row (the original algorithm divides each row by it). ``flat`` is exact:
torch matmul + topk over row blocks, faster on CPU than FAISS ``IndexFlatL2`` at re-ID sizes
(12,936 x 2048, k=30: 2.6 s vs 11 s on this machine) and on the features' device on a GPU.
``hnsw`` is FAISS's approximate graph index for very large N; the row maximum then comes from
an approximate maximum-inner-product search over the augmented vectors [x_j, |x_j|^2].
"""
from __future__ import annotations

from typing import NamedTuple

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

KNN_INDEXES = ("flat", "hnsw")


class Neighbours(NamedTuple):
    """``ids`` (N, k) int64 and ``dist`` (N, k) squared distances, ascending; ``row_max`` (N,)."""

    ids: np.ndarray
    dist: np.ndarray
    row_max: np.ndarray


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """|x_i|^2 per row."""
    return x.pow(2).sum(1)


def knn_exact(x: torch.Tensor, k: int, *, block: int | None = None, progress: bool = False) -> Neighbours:
    """Exact k-NN of every row of ``x`` among all rows (self included at distance 0).

    Rows go in blocks of ``block`` (default: 2048, fewer when N is large, so that one block of
    distances stays under 2^26 entries).
    """
    n = x.shape[0]
    block = block or max(64, min(2048, 2**26 // n))
    norms = sq_norms(x)
    ids = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float64)
    row_max = np.empty(n, dtype=np.float64)
    starts = range(0, n, block)
    for s in tqdm(starts, desc="k-NN", disable=not progress, leave=False):
        e = min(s + block, n)
        d2 = (norms[s:e, None] + norms[None, :]).addmm_(x[s:e], x.t(), alpha=-2.0)
        d2.clamp_(min=0.0)
        d2[torch.arange(e - s), torch.arange(s, e)] = 0.0  # exact zero self-distance
        val, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        ids[s:e] = idx.cpu().numpy()
        dist[s:e] = val.cpu().numpy()
        row_max[s:e] = d2.max(dim=1).values.cpu().numpy()
    return Neighbours(ids, dist, row_max)


def knn_hnsw(x: torch.Tensor, k: int, *, m: int = 32, ef_search: int = 128, progress: bool = False) -> Neighbours:
    """Approximate k-NN with FAISS HNSW; the point itself is put first at distance 0."""
    xs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    n, d = xs.shape
    index = faiss.IndexHNSWFlat(d, m)
    index.hnsw.efSearch = max(ef_search, k + 1)
    index.verbose = progress
    index.add(xs)
    dist, ids = index.search(xs, k + 1)
    ids, dist = _self_first(ids.astype(np.int64), dist.astype(np.float64), k)
    # max_j |x_i - x_j|^2 = |x_i|^2 + max_j <[-2 x_i, 1], [x_j, |x_j|^2]>
    norms = (xs.astype(np.float64) ** 2).sum(1)
    base = np.hstack([xs, norms[:, None].astype(np.float32)])
    query = np.hstack([-2.0 * xs, np.ones((n, 1), np.float32)])
    far = faiss.IndexHNSWFlat(d + 1, m, faiss.METRIC_INNER_PRODUCT)
    far.hnsw.efSearch = ef_search
    far.add(np.ascontiguousarray(base))
    ip, _ = far.search(np.ascontiguousarray(query), 1)
    row_max = np.maximum(norms + ip[:, 0], dist[:, -1])
    return Neighbours(ids, dist, row_max)


def _self_first(ids: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own id from the search result and prepend it at distance 0 (k columns)."""
    n = ids.shape[0]
    own = np.arange(n)[:, None]
    others = ids != own
    # keep the first k-1 non-self results (a row's own id appears at most once)
    order = np.argsort(~others, axis=1, kind="stable")[:, : k - 1]
    ids_o = np.take_along_axis(ids, order, axis=1)
    dist_o = np.clip(np.take_along_axis(dist, order, axis=1), 0.0, None)
    return np.hstack([own, ids_o]), np.hstack([np.zeros((n, 1)), dist_o])


def knn(x: torch.Tensor, k: int, *, index: str = "flat", progress: bool = False) -> Neighbours:
    """Dispatch to the exact (``flat``) or approximate (``hnsw``) search; ``k`` includes self."""
    if index == "flat":
        return knn_exact(x, k, progress=progress)
    if index == "hnsw":
        return knn_hnsw(x, k, progress=progress)
    raise ValueError(f"unknown k-NN index {index!r}; choose one of {KNN_INDEXES}")
