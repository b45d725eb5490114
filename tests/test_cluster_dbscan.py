"""eps rule and DBSCAN on the sparse Jaccard distance vs the dense rule and scikit-learn."""
import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from fastmmt.cluster import ClusterError, dbscan, dbscan_eps_from_rho, k_reciprocal_jaccard
from fastmmt.cluster.dbscan import connected_components
from test_cluster_jaccard import blobs
from test_cluster_reference import dense_eps


@pytest.fixture(scope="module")
def jac():
    x, _ = blobs(300, 24, 15, 0.9, seed=4)
    return k_reciprocal_jaccard(x, 20, 6)


@pytest.mark.parametrize("rho", [1.6e-3, 1e-2, 3e-2, 0.2, 0.6])
def test_sparse_eps_equals_dense_eps(jac, rho):
    dense = jac.to_dense()
    upper = dense[np.triu_indices(300, 1)]
    assert not np.any((upper > 0) & (upper < 1e-3))  # no rounding-noise zeros: literal rule applies
    stored_upper = int((dense[np.triu_indices(300, 1)] < 1).sum())
    eps = dbscan_eps_from_rho(jac, rho)
    assert eps == pytest.approx(dense_eps(dense, rho), rel=1e-6, abs=1e-7)
    assert eps == pytest.approx(dbscan_eps_from_rho(dense, rho), rel=1e-6)
    if rho == 0.6:  # more pairs than the sparse support: the absent 1s enter the mean
        assert round(rho * 300 * 299 / 2) > stored_upper and eps > 0.6


def test_equal_encodings_are_exact_zeros():
    """Points with equal encodings are at distance exactly 0 whatever the rounding, so eps (which
    counts only positive distances) does not depend on the scale the features came in."""
    x, _ = blobs(300, 32, 12, 0.5, seed=11)
    eps = []
    for scale in (1.0, 3.0):
        z = scale * x.astype(np.float32)
        jac = k_reciprocal_jaccard(z / np.linalg.norm(z, axis=1, keepdims=True))
        vals = jac.distances
        assert not np.any((vals > 0) & (vals < 1e-6))
        eps.append(dbscan_eps_from_rho(jac, 0.02))
    assert eps[0] == pytest.approx(eps[1], rel=1e-5)


def test_eps_counts_zero_distances_out():
    # duplicated points have Jaccard 0: they are not "positive" and leave P
    x, _ = blobs(60, 8, 4, 0.7, seed=5)
    x = np.vstack([x, x[:5]])
    jac = k_reciprocal_jaccard(x, 10, 3)
    dense = jac.to_dense()
    assert (dense[np.triu_indices(65, 1)] == 0).sum() >= 5
    assert dbscan_eps_from_rho(jac, 0.05) == pytest.approx(dense_eps(dense, 0.05), rel=1e-6)


@pytest.mark.parametrize("rho,min_samples", [(1e-2, 4), (3e-2, 4), (3e-2, 8), (0.1, 2)])
def test_labels_equal_sklearn(jac, rho, min_samples):
    eps = dbscan_eps_from_rho(jac, rho)
    ref = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(jac.to_dense())
    labels = dbscan(jac, eps, min_samples)
    assert labels.dtype == np.int64
    assert len(set(ref)) > 2 and (ref == -1).any()  # a non-trivial case: clusters and outliers
    np.testing.assert_array_equal(labels, ref)  # identical numbering, not only up to permutation
    np.testing.assert_array_equal(dbscan(jac.to_dense(), eps, min_samples), ref)


def test_all_noise_and_eps_at_least_one(jac):
    eps = dbscan_eps_from_rho(jac, 3e-2)
    assert np.all(dbscan(jac, eps, 301) == -1)  # no neighbourhood can hold 301 of 300 points
    assert np.all(dbscan(jac, 1.0, 4) == 0)  # every pair within distance 1: one cluster


def test_connected_components_chain():
    # a long chain numbered backwards, plus an isolated node and a separate pair
    n = 50
    u = np.arange(1, 40)[::-1]
    v = u - 1
    root = connected_components(n, np.r_[u, 45], np.r_[v, 47])
    assert np.all(root[:40] == 0) and root[45] == root[47] == 45
    assert np.all(root[40:45] == np.arange(40, 45)) and root[46] == 46


def test_errors(jac):
    with pytest.raises(ClusterError, match="rho"):
        dbscan_eps_from_rho(jac, 0.0)
    with pytest.raises(ClusterError, match="selects no distance"):
        dbscan_eps_from_rho(jac, 1e-7)
    with pytest.raises(ClusterError, match="square"):
        dbscan(np.zeros((3, 4)), 0.1)
    with pytest.raises(ClusterError, match="eps"):
        dbscan(jac, float("nan"))
