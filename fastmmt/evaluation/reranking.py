"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances.

final = (1 - lambda) * Jaccard + lambda * d, over the joint set (queries + gallery), where d is
the base distance divided by its row maximum and Jaccard is the k-reciprocal Jaccard distance
(:mod:`fastmmt.cluster`: same machinery as the DBSCAN pseudo-labels).

Base distance: used as given. fastmmt's evaluation distance is the squared Euclidean distance
between normalised features, which is exactly what Zhong's code computes from the Euclidean
distances it expects (it squares its input). The MMT reference squared an already squared
distance and crashed on a tuple (``pairwise_distance`` returns three values); neither is copied.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from fastmmt.cluster._threads import limited_threads
from fastmmt.cluster.encoding import check_k, encode, query_expand
from fastmmt.cluster.jaccard import SparseJaccard, feature_pair_distance, jaccard_rows
from fastmmt.cluster.knn import knn, sq_norms
from fastmmt.cluster.result import as_feature_tensor


# Zhong et al.'s k-reciprocal re-ranking settings (the paper's and MMT's evaluation)
RERANK_K1, RERANK_K2, RERANK_LAMBDA = 20, 6, 0.3

def _check_dist(name: str, m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} has {int((~np.isfinite(m)).sum())} NaN/inf entries")
    return m


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = RERANK_K1,
               k2: int = RERANK_K2, lambda_value: float = RERANK_LAMBDA) -> np.ndarray:
    """Re-ranked (num_query, num_gallery) float32 distances from the three dense distance blocks."""
    check_k(k1, k2)
    q_g = np.asarray(q_g_dist)
    if q_g.ndim != 2:
        raise ValueError(f"q_g_dist must be 2-D (num_query, num_gallery), got shape {q_g.shape}")
    nq, ng = q_g.shape
    q_g = _check_dist("q_g_dist", q_g, (nq, ng))
    q_q = _check_dist("q_q_dist", q_q_dist, (nq, nq))
    g_g = _check_dist("g_g_dist", g_g_dist, (ng, ng))
    full = np.block([[q_q, q_g], [q_g.T, g_g]])
    n = nq + ng
    scale = full.max(axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    ids = np.argsort(full, axis=1, kind="stable")[:, : min(k1 + 1, n)]
    v = query_expand(encode(ids, lambda r, c: full[r, c] / scale[r], k1), ids, k2)
    jac = jaccard_rows(v, nq).to_dense()[:, nq:]
    return ((1 - lambda_value) * jac + lambda_value * q_g / scale[:nq, None]).astype(np.float32)


def iter_re_ranking_blocks(qf: torch.Tensor | np.ndarray, gf: torch.Tensor | np.ndarray, k1: int = RERANK_K1,
                           k2: int = RERANK_K2, lambda_value: float = RERANK_LAMBDA, *, block_size: int = 1024,
                           index: str = "flat", num_threads: int | None = None,
                           progress: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Re-ranked distances from features, ``block_size`` query rows at a time: yields
    ``(first query row, float32 block (rows, num_gallery))``.

    The base distance is the squared Euclidean distance between the given features. Memory
    apart from the yielded block is linear in the number of images (k-NN lists, the sparse
    encoding and the queries' sparse Jaccard rows), so MSMT17's test set (11,659 x 82,161) fits.
    """
    check_k(k1, k2)
    q = as_feature_tensor(qf, "query features")
    g = as_feature_tensor(gf, "gallery features")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query and gallery feature sizes differ: {q.shape[1]} vs {g.shape[1]}")
    nq = q.shape[0]
    x = torch.cat([q, g.to(q.device, q.dtype)])
    with limited_threads(num_threads), torch.no_grad():
        nb = knn(x, min(k1 + 1, x.shape[0]), index=index, progress=progress)
        v = encode(nb.ids, feature_pair_distance(x, nb), k1, progress=progress)
        v = query_expand(v, nb.ids, k2, progress=progress)
        jac = jaccard_rows(v, nq, progress=progress)
        norms = sq_norms(x)
        scale = np.where(nb.row_max > 0, nb.row_max, 1.0)
        for s in range(0, nq, block_size):
            e = min(s + block_size, nq)
            d2 = (norms[s:e, None] + norms[None, nq:]).addmm_(x[s:e], x[nq:].t(), alpha=-2.0)
            orig = d2.clamp_(min=0.0).cpu().numpy().astype(np.float64) / scale[s:e, None]
            yield s, ((1 - lambda_value) * _gallery_block(jac, s, e, nq) + lambda_value * orig).astype(np.float32)


def _gallery_block(jac: SparseJaccard, s: int, e: int, nq: int) -> np.ndarray:
    """Dense Jaccard rows s..e restricted to the gallery columns (1 where not stored)."""
    out = np.ones((e - s, jac.num_cols - nq), dtype=np.float64)
    a, b = jac.indptr[s], jac.indptr[e]
    rows = np.repeat(np.arange(e - s), np.diff(jac.indptr[s:e + 1]))
    cols = jac.indices[a:b]
    gal = cols >= nq
    out[rows[gal], cols[gal] - nq] = jac.distances[a:b][gal]
    return out


def re_ranking_features(qf: torch.Tensor | np.ndarray, gf: torch.Tensor | np.ndarray, k1: int = RERANK_K1,
                        k2: int = RERANK_K2, lambda_value: float = RERANK_LAMBDA, *, index: str = "flat",
                        num_threads: int | None = None, progress: bool = False) -> np.ndarray:
    """Re-ranked (num_query, num_gallery) float32 distances from features (see the block version)."""
    q = as_feature_tensor(qf, "query features")
    g = as_feature_tensor(gf, "gallery features")
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
    for s, blk in iter_re_ranking_blocks(q, g, k1, k2, lambda_value, index=index,
                                         num_threads=num_threads, progress=progress):
        out[s:s + blk.shape[0]] = blk
    return out
