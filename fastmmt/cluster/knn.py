"""k nearest neighbours under squared Euclidean distance, plus each row's largest distance.

The k-reciprocal encoding needs, per point, its k1+1 nearest points (itself first) and the
largest distance in its row (the original algorithm divides each row by it). ``flat`` is exact:
it computes each pair's distance once (the matrix is symmetric) in row strips. float32 CPU
features: strips from FAISS's ``pairwise_L2sqr`` (BLAS sgemm; faster than FAISS ``IndexFlatL2``,
which computes every pair twice, and than torch's matmul + top-k over all pairs: bench/RESULTS.md),
the k nearest kept in FAISS's C++ max-heaps, one per row (a distance costs one comparison with the
row's current k-th unless it enters). Otherwise (float64, GPU): torch's matmul, top-k and merges.
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
    return torch.einsum("ij,ij->i", x, x)


def pair_sq_distances(x: torch.Tensor, norms: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                      *, chunk: int = 2048) -> np.ndarray:
    """float64 |x_r - x_c|^2 for each pair (rows[p], cols[p]), 0 when r == c, from the same
    expansion |x_r|^2 + |x_c|^2 - 2 <x_r, x_c> as the k-NN search. float32 CPU features go
    through FAISS's indexed inner products (no gathered copies of the rows); other dtypes and
    devices through torch, ``chunk`` pairs at a time."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        xs = x.detach().numpy()
        r = np.ascontiguousarray(rows, dtype=np.int64)
        c = np.ascontiguousarray(cols, dtype=np.int64)
        ip = np.empty(len(r), dtype=np.float32)
        faiss.pairwise_indexed_inner_product(xs.shape[1], len(r), faiss.swig_ptr(xs), faiss.swig_ptr(r),
                                             faiss.swig_ptr(xs), faiss.swig_ptr(c), faiss.swig_ptr(ip))
        nn = norms.detach().numpy().astype(np.float64)
        d2 = nn[r] + nn[c] - 2.0 * ip.astype(np.float64)
    else:
        d2 = np.empty(len(rows), dtype=np.float64)
        for s in range(0, len(rows), chunk):
            r = torch.as_tensor(rows[s:s + chunk], device=x.device)
            c = torch.as_tensor(cols[s:s + chunk], device=x.device)
            part = norms[r] + norms[c] - 2.0 * torch.einsum("ij,ij->i", x[r], x[c])
            d2[s:s + chunk] = part.cpu().numpy()
    d2 = np.clip(d2, 0.0, None)
    d2[rows == cols] = 0.0
    return d2


def knn_exact(x: torch.Tensor, k: int, *, block: int | None = None, progress: bool = False) -> Neighbours:
    """Exact k-NN of every row of ``x`` among all rows (self included at distance 0).

    The distance matrix is symmetric, so each pair is computed once: strip b holds the distances
    from row block b to every row from the start of block b on. Its row-wise top-k serves block
    b's rows; seen by column, it offers the later rows every distance below their current k-th
    best, merged into their running top-k. Strips go from the last block to the first, so every
    later row already holds k candidates from its own strip and few entries pass that threshold
    (float32 CPU features: both sides go through FAISS's per-row heaps, :func:`_knn_exact_faiss`).
    The row maxima come from the same strips. Blocks have ``block`` rows (default: 512, fewer
    when N is large so a strip stays under 2^26 entries). Ties at the k-th distance are broken
    arbitrarily; the k returned are sorted by (distance, id).
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N] = [1, {n}], got {k}")
    block = block or max(64, min(512, 2**26 // n))
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return _knn_exact_faiss(np.ascontiguousarray(x.detach().numpy()), k, block, progress)
    norms = sq_norms(x)
    best_d = torch.full((n, k), float("inf"), dtype=x.dtype, device=x.device)
    best_i = torch.zeros((n, k), dtype=torch.int64, device=x.device)
    row_max = torch.zeros(n, dtype=x.dtype, device=x.device)
    starts = range(0, n, block)
    for s in tqdm(reversed(starts), total=len(starts), desc="k-NN", disable=not progress, leave=False):
        e = min(s + block, n)
        d2 = _strip(x, norms, s, e)
        row_max[s:e] = torch.maximum(row_max[s:e], d2.amax(dim=1))
        val, idx = torch.topk(d2, min(k, n - s), dim=1, largest=False, sorted=False)
        _merge(best_d, best_i, slice(s, e), val, idx + s)
        if e < n:  # the same distances seen from the later rows
            later = d2[:, e - s:]
            row_max[e:] = torch.maximum(row_max[e:], later.amax(dim=0))
            _merge_below_threshold(best_d, best_i, later, e, s)
    ids, dist = _sort_by_distance_then_id(best_d.cpu().numpy(), best_i.cpu().numpy())
    return Neighbours(ids, dist, row_max.cpu().numpy().astype(np.float64))


def _knn_exact_faiss(xs: np.ndarray, k: int, block: int, progress: bool) -> Neighbours:
    """:func:`knn_exact` for float32 CPU features: the same strips, from FAISS's ``pairwise_L2sqr``
    (BLAS sgemm under FAISS's thread setting), and FAISS's per-row max-heaps for the selection
    (C++ ``addn``: each distance is compared with its row's root, the current k-th, and replaces
    it when smaller). A strip's rows go in as they are; its later columns (the same distances
    seen from the later rows) through a transposed copy of that part."""
    n, d = xs.shape
    val = np.full((n, k), np.inf, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    heaps = faiss.float_maxheap_array_t()  # pointers into val and ids, which outlive it
    heaps.nh, heaps.k, heaps.val, heaps.ids = n, k, faiss.swig_ptr(val), faiss.swig_ptr(ids)
    row_max = np.zeros(n, dtype=np.float32)
    starts = range(0, n, block)
    for s in tqdm(reversed(starts), total=len(starts), desc="k-NN", disable=not progress, leave=False):
        e = min(s + block, n)
        d2 = np.empty((e - s, n - s), dtype=np.float32)
        faiss.pairwise_L2sqr(d, e - s, faiss.swig_ptr(xs[s:e]), n - s, faiss.swig_ptr(xs[s:]),
                             faiss.swig_ptr(d2))
        np.maximum(d2, 0.0, out=d2)
        own = np.arange(e - s)
        d2[own, own] = 0.0
        np.maximum(row_max[s:e], d2.max(axis=1), out=row_max[s:e])
        heaps.addn(n - s, faiss.swig_ptr(d2), s, s, e - s)  # rows s..e, ids s..N
        if e < n:
            later = np.ascontiguousarray(d2[:, e - s:].T)  # rows e..N, columns: ids s..e
            np.maximum(row_max[e:], later.max(axis=1), out=row_max[e:])
            heaps.addn(e - s, faiss.swig_ptr(later), s, e, n - e)
    ids, dist = _sort_by_distance_then_id(val, ids)
    return Neighbours(ids, dist, row_max.astype(np.float64))


def _strip(x: torch.Tensor, norms: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Squared distances from rows s..e to rows s..N (torch's matmul), clamped at 0, exact 0 to
    themselves."""
    d2 = torch.mm(-2.0 * x[s:e], x[s:].t()).add_(norms[None, s:]).add_(norms[s:e, None])
    d2.clamp_(min=0.0)
    d2[:, : e - s].fill_diagonal_(0.0)
    return d2


def _merge(best_d: torch.Tensor, best_i: torch.Tensor, rows: slice | torch.Tensor, val: torch.Tensor,
           idx: torch.Tensor) -> None:
    """The running top-k of ``rows`` (in place) merged with new candidates (val, idx)."""
    k = best_d.shape[1]
    cand_d = torch.cat([best_d[rows], val], dim=1)
    cand_i = torch.cat([best_i[rows], idx], dim=1)
    top_d, pos = torch.topk(cand_d, k, dim=1, largest=False, sorted=False)
    best_d[rows] = top_d
    best_i[rows] = cand_i.gather(1, pos)


def _merge_below_threshold(best_d: torch.Tensor, best_i: torch.Tensor, later: torch.Tensor,
                           first_col: int, first_row: int) -> None:
    """Merge into the top-k of rows ``first_col + j`` the entries of column j of ``later``
    (distances from rows ``first_row + r``) below that row's current k-th best distance."""
    kth = best_d[first_col:].amax(dim=1)
    r, c = (later < kth).nonzero(as_tuple=True)
    if len(c) == 0:
        return
    c, order = torch.sort(c, stable=True)
    r = r[order]
    cols, counts = torch.unique_consecutive(c, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(cols), device=c.device), counts)
    slot = torch.arange(len(c), device=c.device) - (torch.cumsum(counts, 0) - counts)[group]
    shape = (len(cols), int(counts.max()))
    pad_d = torch.full(shape, float("inf"), dtype=later.dtype, device=later.device)
    pad_i = torch.zeros(shape, dtype=torch.int64, device=later.device)
    pad_d[group, slot] = later[r, c]
    pad_i[group, slot] = r + first_row
    _merge(best_d, best_i, cols + first_col, pad_d, pad_i)


def _sort_by_distance_then_id(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (ids, float64 distances) ordered by distance, ties by id (a stable sort's order)."""
    order = np.lexsort((ids, dist), axis=1)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(dist, order, axis=1).astype(np.float64)


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
