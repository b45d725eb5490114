"""``compute_jaccard_distance``: a drop-in for the ``faiss_rerank.py`` of SpCL and Cluster Contrast
(the same file in ICE, PPLR and their forks), built on fastmmt's sparse k-reciprocal Jaccard.

Same signature and result as the original:
- the k-NN search returns k1 neighbours, the point itself included, so the k-reciprocal sets see
  k1 columns (one fewer than Zhong et al.'s re-ranking, which fastmmt's MMT path follows);
- half sets of round(k1/2) (they see round(k1/2) + 1 columns), a candidate's half set joins
  when more than 2/3 of it lies inside;
- weights ``softmax(-d)`` over the expanded set with ``d = 2 - 2 <x_i, x_j>`` (features meant to
  be L2-normalised, as the callers' are);
- query expansion: the mean of the k2 nearest rows (skipped when k2 == 1);
- ``1 - sum(min) / (2 - sum(min))``, negatives set to 0.
The original builds three dense N x N arrays and loops over every point in Python; here memory is
O(N k1^2) until the result: ``sparse=True`` returns a :class:`SparseJaccard` (distance 1 outside the
stored pairs) that :func:`fastmmt.cluster.dbscan` takes, the default the dense N x N matrix the
original returns. ``search_option`` only chose where FAISS ran; the search here is fastmmt's exact
k-NN. ``use_float16``: V is rounded to float16 as the original stores it, the result is float16.
"""
from __future__ import annotations

import time

import faiss
import numpy as np
import torch

from fastmmt.cluster._threads import limited_threads
from fastmmt.cluster.encoding import encode, query_expand
from fastmmt.cluster.jaccard import SparseJaccard, jaccard_rows
from fastmmt.cluster.knn import knn
from fastmmt.cluster.result import ClusterError, as_feature_tensor
from fastmmt.cluster.sparse import CSR

SEARCH_OPTIONS = (0, 1, 2, 3)  # the original's: GPU raw arrays, GPU index (x2), CPU index


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ClusterError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_arguments(n: int, k1: int, k2: int, search_option: int) -> None:
    """1 <= k1 < N (k1 neighbours per point, itself included), 1 <= k2 <= k1, a known search option."""
    k1, k2 = _int(k1, "k1"), _int(k2, "k2")
    if not 1 <= k1 < n:
        raise ClusterError(f"k1 must be in [1, N - 1] = [1, {n - 1}] for {n} features, got {k1}")
    if not 1 <= k2 <= k1:
        raise ClusterError(f"k2 must be in [1, k1] = [1, {k1}] (query expansion reads the k1 neighbours), got {k2}")
    if search_option not in SEARCH_OPTIONS:
        raise ClusterError(f"search_option must be one of {SEARCH_OPTIONS}, got {search_option!r}")


def _cosine_distance(x: torch.Tensor):
    """``d(i, j) = 2 - 2 <x_i, x_j>`` pair by pair, float64, from the float32 inner products the
    original computes (FAISS's indexed inner products on CPU: no gathered copies of the rows)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        xs = x.numpy()

        def dist(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            r = np.ascontiguousarray(rows, dtype=np.int64)
            c = np.ascontiguousarray(cols, dtype=np.int64)
            ip = np.empty(len(r), dtype=np.float32)
            faiss.pairwise_indexed_inner_product(xs.shape[1], len(r), faiss.swig_ptr(xs), faiss.swig_ptr(r),
                                                 faiss.swig_ptr(xs), faiss.swig_ptr(c), faiss.swig_ptr(ip))
            return 2.0 - 2.0 * ip.astype(np.float64)

        return dist

    def dist_torch(rows: np.ndarray, cols: np.ndarray, chunk: int = 2048) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        for s in range(0, len(rows), chunk):
            r = torch.as_tensor(rows[s:s + chunk], device=x.device)
            c = torch.as_tensor(cols[s:s + chunk], device=x.device)
            out[s:s + chunk] = (2.0 - 2.0 * torch.einsum("ij,ij->i", x[r], x[c])).double().cpu().numpy()
        return out

    return dist_torch


def _half(v: CSR) -> CSR:
    return v._replace(data=v.data.astype(np.float16).astype(np.float64))


def compute_jaccard_distance(target_features: torch.Tensor | np.ndarray, k1: int = 20, k2: int = 6,
                             print_flag: bool = True, search_option: int = 0, use_float16: bool = False,
                             *, sparse: bool = False, num_threads: int | None = None
                             ) -> np.ndarray | SparseJaccard:
    """k-reciprocal Jaccard distances of the rows of ``target_features`` (N, D), as the original
    ``faiss_rerank.compute_jaccard_distance``: a dense (N, N) float32 (float16) array, or with
    ``sparse=True`` a :class:`SparseJaccard` for :func:`fastmmt.cluster.dbscan`."""
    start = time.time()
    if print_flag:
        print("Computing jaccard distance...")
    x = as_feature_tensor(target_features, "target_features")
    n = x.shape[0]
    check_arguments(n, k1, k2, search_option)
    with limited_threads(num_threads), torch.no_grad():
        ids = knn(x, k1).ids
        v = encode(ids, _cosine_distance(x), k1)
        if use_float16:
            v = _half(v)
        if k2 != 1:
            v = query_expand(v, ids, k2)
            if use_float16:
                v = _half(v)
        jac = jaccard_rows(v, n, unit_rows=True, zero_tol=0.0)
    if print_flag:
        print(f"Jaccard distance computing time cost: {time.time() - start}")
    if sparse:
        return jac
    dense = jac.to_dense()
    return dense.astype(np.float16) if use_float16 else dense
