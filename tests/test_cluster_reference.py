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


# --- checks of the reference itself on a case small enough to do by hand ------------------------

def _hand_case():
    """Points 0, 1, 10, 11 on a line, k1 = 1, k2 = 1: two reciprocal pairs {0,1} and {2,3}."""
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    # squared distances / row max: row 0 max 121, row 1 max 100, row 2 max 100, row 3 max 121
    w0 = np.exp(-np.array([0.0, 1 / 121]))
    w1 = np.exp(-np.array([1 / 100, 0.0]))
    v0, v1 = w0 / w0.sum(), w1 / w1.sum()
    j01 = 1 - np.minimum(v0, v1).sum() / np.maximum(v0, v1).sum()
    w2 = np.exp(-np.array([0.0, 1 / 100]))
    w3 = np.exp(-np.array([1 / 121, 0.0]))
    v2, v3 = w2 / w2.sum(), w3 / w3.sum()
    j23 = 1 - np.minimum(v2, v3).sum() / np.maximum(v2, v3).sum()
    expected = np.ones((4, 4))
    np.fill_diagonal(expected, 0.0)
    expected[0, 1] = expected[1, 0] = j01
    expected[2, 3] = expected[3, 2] = j23
    return x, expected


def test_reference_matches_hand_computed_case():
    x, expected = _hand_case()
    _, _, vq = dense_encoding(dense_sq_euclidean(x), k1=1, k2=1)
    np.testing.assert_allclose(dense_jaccard(vq), expected, atol=1e-12)


def test_reference_eps_hand_case():
    jac = np.array([[0, 0.2, 0.5, 1], [0.2, 0, 0.1, 0.4], [0.5, 0.1, 0, 0], [1, 0.4, 0, 0]], float)
    # positive upper entries: 0.2 0.5 1 0.1 0.4 (the 0 at (2, 3) is not positive): P = 5
    assert dense_eps(jac, 0.4) == (0.1 + 0.2) / 2
    assert dense_eps(jac, 0.5) == (0.1 + 0.2) / 2  # round(2.5) = 2 (half to even)
    assert dense_eps(jac, 0.7) == (0.1 + 0.2 + 0.4 + 0.5) / 4
