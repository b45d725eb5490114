"""Straightforward dense k-reciprocal re-ranking (Zhong et al. 2017), the tests' reference.

Written from the paper's algorithm with plain loops and float64 full matrices, independently of
fastmmt's sparse code. ``dist`` is the full (N, N) base distance matrix.
"""
import numpy as np


def _k_reciprocal(rank, i, k):
    forward = rank[i, : k + 1]
    return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=np.int64)


def dense_encoding(dist, k1, k2):
    """Row-normalised distances, the neighbour ranking and the query-expanded encoding V'."""
    n = dist.shape[0]
    d = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(d, axis=1, kind="stable")
    v = np.zeros((n, n))
    kh = int(np.around(k1 / 2.0))
    for i in range(n):
        r = _k_reciprocal(rank, i, k1)
        expanded = set(r.tolist())
        for c in r:
            rc = _k_reciprocal(rank, c, kh)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expanded.update(rc.tolist())
        e = np.array(sorted(expanded))
        w = np.exp(-d[i, e])
        v[i, e] = w / w.sum()
    vq = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    return d, rank, vq


def dense_jaccard(vq):
    """1 - sum min / sum max between every pair of rows, clipped at 0."""
    n = vq.shape[0]
    out = np.empty((n, n))
    for i in range(n):
        mn = np.minimum(vq[i][None, :], vq).sum(1)
        mx = np.maximum(vq[i][None, :], vq).sum(1)
        out[i] = 1.0 - mn / mx
    return np.clip(out, 0.0, None)


def dense_sq_euclidean(x):
    """Squared Euclidean distances in float64 with an exact zero diagonal."""
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(1)
    d = np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None)
    np.fill_diagonal(d, 0.0)
    return d


def dense_eps(jac, rho):
    """MMT's eps: mean of the smallest round(rho * P) positive strict-upper-triangle entries."""
    tri = jac[np.triu_indices(jac.shape[0], 1)]
    tri = np.sort(tri[tri > 0])
    top = int(np.round(rho * tri.size))
    return tri[:top].mean()


def dense_re_ranking(q_g, q_q, g_g, k1, k2, lam):
    """Re-ranked query-gallery distances over the joint (query + gallery) set."""
    nq = q_g.shape[0]
    full = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64)
    d, _, vq = dense_encoding(full, k1, k2)
    jac = dense_jaccard(vq)
    return ((1 - lam) * jac + lam * d)[:nq, nq:]
