"""The trainer's interface: KMeansClusterer, DBSCANClusterer (eps fixed once), KnownLabels,
build_clusterer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score as nmi

from fastmmt.cluster import (ClusterError, ClusterResult, DBSCANClusterer, KMeansClusterer, KnownLabels,
                             build_clusterer, dbscan, dbscan_eps_from_rho, k_reciprocal_jaccard, kmeans)
from test_cluster_jaccard import blobs

RHO = 0.04  # about half the same-blob pairs (1/12 of all pairs), as 1.6e-3 is at Market


@pytest.fixture(scope="module")
def data():
    x, y = blobs(300, 32, 25, 0.5, seed=11)  # 25 identities of ~12 images
    return torch.from_numpy(x).float(), y


def test_kmeans_clusterer_recovers_blobs(data):
    x, y = data
    clusterer = build_clusterer("kmeans", k=25, seed=0)
    assert isinstance(clusterer, KMeansClusterer)
    res = clusterer(x * 0.5, epoch=3)  # k-means clusters the features as given (no normalising)
    assert isinstance(res, ClusterResult) and res.info["epoch"] == 3
    assert nmi(y, res.labels) > 0.95
    np.testing.assert_allclose(res.centroids.norm(dim=1).numpy(), 0.5 * np.ones(25), atol=0.2)


@pytest.mark.parametrize("seed_dim", [None, 4])
def test_kmeans_clusterer_seeds_in_the_space_it_is_given(seed_dim):
    # adapt.kmeans_seed_dim reaches the seeding: None = k-means++ in the full space (as
    # scikit-learn, the official code's k-means), an int = in a random projection of that size
    x, _ = blobs(240, 48, 20, 2.0, seed=5)  # overlapping blobs: the seeding changes the result
    x = torch.from_numpy(x).float()
    res = build_clusterer("kmeans", k=20, seed=3, niter=5, seed_dim=seed_dim)(x, epoch=0)
    direct = kmeans(x, 20, seed=3, niter=5, seed_dim=seed_dim)
    other = kmeans(x, 20, seed=3, niter=5, seed_dim=8 if seed_dim is None else None)
    np.testing.assert_array_equal(res.labels, direct.labels)
    assert not np.array_equal(res.labels, other.labels)


def test_dbscan_clusterer_recovers_blobs(data):
    x, y = data
    res = DBSCANClusterer(rho=RHO)(x, epoch=0)
    assert res.num_clusters == res.labels.max() + 1 == res.centroids.shape[0]
    kept = res.labels >= 0
    assert res.info["num_outliers"] == int((~kept).sum()) < 75
    assert 20 <= res.num_clusters <= 30
    assert nmi(y[kept], res.labels[kept]) > 0.95
    means = np.stack([F.normalize(x, dim=1).numpy()[res.labels == c].mean(0)
                      for c in range(res.num_clusters)])
    np.testing.assert_allclose(res.centroids.numpy(), means, atol=1e-5)


def test_dbscan_clusterer_normalises_and_matches_functions(data):
    x, _ = data
    res = DBSCANClusterer(rho=RHO)(3.0 * x, epoch=0)  # scale must not matter: re-normalised
    jac = k_reciprocal_jaccard(F.normalize(x, dim=1))
    eps = dbscan_eps_from_rho(jac, RHO)
    assert res.info["eps"] == pytest.approx(eps, rel=1e-6)
    np.testing.assert_array_equal(res.labels, dbscan(jac, eps, 4))


def test_eps_fixed_at_first_call_and_resumable(data):
    x, _ = data
    rng = np.random.default_rng(0)
    moved = F.normalize(x + 0.05 * torch.from_numpy(rng.standard_normal(x.shape)).float(), dim=1)
    c = DBSCANClusterer(rho=RHO)
    first = c(x, epoch=0)
    later = c(moved, epoch=1)
    assert later.info["eps"] == first.info["eps"] and later.info["eps_epoch"] == 0
    # eps recomputed on the moved features would differ: the fixed one is really kept
    assert dbscan_eps_from_rho(k_reciprocal_jaccard(moved), RHO) != pytest.approx(first.info["eps"])
    resumed = DBSCANClusterer(rho=RHO)
    resumed.load_state_dict(c.state_dict())
    again = resumed(moved, epoch=1)
    np.testing.assert_array_equal(again.labels, later.labels)
    assert again.info["eps"] == first.info["eps"]


def test_no_cluster_raises(data):
    x, _ = data
    with pytest.raises(ClusterError, match="DBSCAN found no cluster"):
        DBSCANClusterer(rho=RHO, min_samples=301)(x, epoch=0)


def test_bad_state_and_method():
    c = DBSCANClusterer()
    with pytest.raises(KeyError, match="eps"):
        c.load_state_dict({"rho": 1.6e-3})
    with pytest.raises(ClusterError, match="invalid eps"):
        c.load_state_dict({"eps": float("nan"), "eps_epoch": 0})
    with pytest.raises(ClusterError, match="unknown clustering method 'spectral'"):
        build_clusterer("spectral")
    with pytest.raises(ClusterError, match="k=400 .* N=300"):
        KMeansClusterer(k=400)(torch.randn(300, 8), epoch=0)


def test_known_labels_renumber_by_first_appearance_with_cluster_means():
    x = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    c = build_clusterer("known", labels=[5003, -1, 5001, 5003, 5001, 7])
    res = c(x, epoch=3)
    assert res.labels.tolist() == [0, -1, 1, 0, 1, 2] and res.num_clusters == 3
    expected = torch.stack([(x[0] + x[3]) / 2, (x[2] + x[4]) / 2, x[5]]).float()  # by hand, outlier row 1 ignored
    torch.testing.assert_close(res.centroids, expected)
    assert c(x, epoch=4).labels.tolist() == res.labels.tolist()  # the same every epoch
    with pytest.raises(ClusterError, match="5 feature rows but 6 known labels"):
        c(x[:5], epoch=0)
    with pytest.raises(ClusterError, match="integer"):
        KnownLabels(np.array([0.5, 1.0]))
    with pytest.raises(ClusterError, match="all negative"):
        KnownLabels([-1, -1])
