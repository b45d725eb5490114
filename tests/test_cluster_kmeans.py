"""FAISS k-means: quality vs scikit-learn, centroids, determinism, errors, GPU branch selection."""
import sys

import faiss
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score as nmi

from fastmmt.cluster import ClusterError, kmeans
from fastmmt.cluster._threads import limited_threads
from fastmmt.cluster.kmeans import resolve_kmeans_backend, restart_seeds

kmeans_module = sys.modules["fastmmt.cluster.kmeans"]  # the package's `kmeans` name is the function
from test_cluster_jaccard import blobs


@pytest.fixture(scope="module")
def data():
    return blobs(1200, 32, 40, 0.9, seed=7)


def test_quality_vs_sklearn_kmeanspp(data):
    x, y = data
    res = kmeans(x, 40, seed=0, nredo=3)
    ref = KMeans(40, init="k-means++", n_init=10, random_state=0).fit(x)
    assert res.info["inertia"] <= ref.inertia_ * 1.02
    assert nmi(y, res.labels) >= nmi(y, ref.labels_) - 0.01
    assert nmi(y, res.labels) > 0.95


def test_labels_centroids_inertia_consistent(data):
    x, _ = data
    res = kmeans(torch.from_numpy(x).float(), 40, seed=1)
    assert res.labels.dtype == np.int64 and res.labels.shape == (len(x),)
    assert res.num_clusters == 40 == len(np.unique(res.labels)) and res.labels.min() == 0
    assert res.centroids.dtype == torch.float32 and res.centroids.shape == (40, 32)
    means = np.stack([x[res.labels == c].mean(0) for c in range(40)])
    np.testing.assert_allclose(res.centroids.numpy(), means, atol=1e-6)
    inertia = ((x - means[res.labels]) ** 2).sum()
    assert res.info["inertia"] == pytest.approx(inertia, rel=1e-5)
    # final labels are the nearest centroid among FAISS's last centroids: each point is at
    # least as close to its own cluster mean as a k-means fixed point allows (Lloyd converged)
    d = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == res.labels).mean() > 0.99


@pytest.mark.parametrize("init,seed_dim", [("k-means++", 256), ("k-means++", 8), ("random", None)])
def test_deterministic_with_seed(data, init, seed_dim):
    x, _ = data
    a = kmeans(x, 40, seed=3, nredo=2, init=init, seed_dim=seed_dim)
    b = kmeans(x, 40, seed=3, nredo=2, init=init, seed_dim=seed_dim)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert torch.equal(a.centroids, b.centroids)


def test_restarts_keep_the_best(data, monkeypatch):
    x, _ = data
    # restart r of a run gets seed 5 + r here, so three one-restart runs are its three restarts
    monkeypatch.setattr(kmeans_module, "restart_seeds", lambda seed, nredo: [seed + r for r in range(nredo)])
    singles = [kmeans(x, 40, seed=s).info["inertia"] for s in (5, 6, 7)]
    assert kmeans(x, 40, seed=5, nredo=3).info["inertia"] == pytest.approx(min(singles), rel=1e-6)


def test_restart_seeds_independent_across_run_seeds():
    runs = {s: restart_seeds(s, 10) for s in range(50)}
    assert runs == {s: restart_seeds(s, 10) for s in range(50)}  # deterministic
    assert all(restart_seeds(s, 3) == runs[s][:3] for s in runs)  # nredo restarts: a prefix
    drawn = [r for seeds in runs.values() for r in seeds]
    assert len(set(drawn)) == len(drawn)  # no run shares a restart with another (500 draws of 2^31)
    assert all(isinstance(r, int) and 0 <= r < 2**31 - 1 for r in drawn)  # FAISS's seed is a C int


def test_other_run_seeds_other_clusterings():
    # unstructured points have many k-means minima: runs with seeds 1, 2, 3 (10 restarts each)
    # return different clusterings; with restart seeds seed + r they shared 8 of 10 restarts
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    labels = [kmeans(x, 20, seed=s, nredo=10, niter=20).labels for s in (1, 2, 3)]
    assert all(nmi(a, b) < 0.99 for i, a in enumerate(labels) for b in labels[i + 1:])


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed(data, seed):
    with pytest.raises(ClusterError, match="seed must be a non-negative integer"):
        kmeans(data[0], 40, seed=seed)


def test_iteration_limit_reaches_faiss(data):
    x, _ = data
    one = kmeans(x, 40, seed=5, niter=1, nredo=3)
    assert one.info["iterations"] == 3  # one Lloyd iteration per restart
    full = kmeans(x, 40, seed=5, niter=300, nredo=3)
    assert 3 < full.info["iterations"] <= 900
    # more iterations from the same seeds never end worse (Lloyd lowers the objective)
    assert full.info["inertia"] <= one.info["inertia"] * (1 + 1e-6)


def test_k_equals_n_and_duplicates():
    x = np.repeat(np.eye(5, dtype=np.float32), 3, axis=0)  # 5 distinct points, 3 copies each
    res = kmeans(x, 5, seed=0)
    assert res.num_clusters == 5
    assert nmi(np.repeat(np.arange(5), 3), res.labels) == pytest.approx(1.0)
    res = kmeans(x[::3][:4], 4)
    assert sorted(res.labels.tolist()) == [0, 1, 2, 3]


def test_empty_clusters_are_compacted():
    # 8 points but only 2 distinct values: at most 2 non-empty clusters whatever FAISS does
    x = np.array([[0.0, 0.0]] * 4 + [[5.0, 5.0]] * 4, dtype=np.float32)
    res = kmeans(x, 4, seed=0)
    assert res.num_clusters == len(np.unique(res.labels)) == res.centroids.shape[0]
    assert res.info["empty_clusters"] == 4 - res.num_clusters
    assert set(res.labels.tolist()) == set(range(res.num_clusters))
    assert res.labels[0] != res.labels[-1]


def test_errors():
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    with pytest.raises(ClusterError, match="k=11 .* N=10"):
        kmeans(x, 11)
    with pytest.raises(ClusterError, match="positive integer"):
        kmeans(x, 0)
    bad = x.copy()
    bad[4, 1] = np.inf
    with pytest.raises(ClusterError, match="1 of 10 rows"):
        kmeans(bad, 2)
    with pytest.raises(ClusterError, match="empty"):
        kmeans(np.zeros((0, 3), np.float32), 1)
    with pytest.raises(ClusterError, match="2-D"):
        kmeans(np.zeros(5, np.float32), 1)
    with pytest.raises(ClusterError, match="init"):
        kmeans(x, 2, init="afk-mc2")
    with pytest.raises(ClusterError, match="backend"):
        kmeans(x, 2, backend="scipy")
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ClusterError, match="get_num_gpus"):
            kmeans(x, 2, backend="faiss-gpu")


def test_thread_limit_is_scoped():
    before = (faiss.omp_get_max_threads(), torch.get_num_threads())
    with limited_threads(1):
        assert faiss.omp_get_max_threads() == 1 and torch.get_num_threads() == 1
    assert (faiss.omp_get_max_threads(), torch.get_num_threads()) == before
    with pytest.raises(ValueError, match="num_threads"):
        with limited_threads(0):
            pass


def test_gpu_branch_selected_when_faiss_sees_a_gpu(monkeypatch, data):
    """No GPU here: fake FAISS's GPU classes by CPU ones and run the whole GPU code path. The index
    goes on the run's CUDA device (torch's current one for CPU features), and each device gets
    one StandardGpuResources for the whole process, not one per call."""
    kmeans_mod = sys.modules["fastmmt.cluster.kmeans"]  # the package re-exports the function as `kmeans`
    x, _ = data
    calls = []

    class FakeResources:
        def __init__(self):
            calls.append("resources")

    class FakeConfig:
        device = -1

    def fake_gpu_index(res, d, cfg):
        assert isinstance(res, FakeResources)
        calls.append(("index", d, cfg.device))
        return faiss.IndexFlatL2(d)

    kmeans_mod.gpu_resources.cache_clear()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "StandardGpuResources", FakeResources)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", FakeConfig)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", fake_gpu_index)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # e.g. torch.cuda.set_device(1)
    try:
        assert resolve_kmeans_backend("auto") == "faiss-gpu"
        res = kmeans(x, 40, seed=0)
        assert res.info["backend"] == "faiss-gpu" and res.info["gpu_device"] == 1
        assert calls == ["resources", ("index", 32, 1)]
        kmeans(x, 40, seed=1)
        assert calls == ["resources", ("index", 32, 1), ("index", 32, 1)]  # resources reused
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        kmeans(x, 40, seed=1)
        assert calls[3:] == ["resources", ("index", 32, 0)]  # a second device, its own resources
    finally:
        kmeans_mod.gpu_resources.cache_clear()  # no fake left cached for later tests
    cpu = kmeans(x, 40, seed=0, backend="faiss")
    np.testing.assert_array_equal(res.labels, cpu.labels)


def test_auto_is_cpu_without_gpu(monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)  # also on a CUDA machine
    assert resolve_kmeans_backend("auto") == "faiss"


@pytest.mark.gpu
def test_faiss_gpu_kmeans_matches_cpu(data):
    """The real GpuIndexFlatL2 assignment: same quality as the CPU run from the same seeding."""
    x, y = data
    assert faiss.get_num_gpus() > 0, "faiss sees no GPU: is the faiss-gpu build installed?"
    gpu = kmeans(x, 40, seed=0, backend="faiss-gpu")
    cpu = kmeans(x, 40, seed=0, backend="faiss")
    assert gpu.info["backend"] == "faiss-gpu"
    # float32 sums in another order may move a boundary point; the clustering must agree
    assert nmi(cpu.labels, gpu.labels) > 0.99 and nmi(y, gpu.labels) > 0.95
    assert gpu.info["inertia"] == pytest.approx(cpu.info["inertia"], rel=1e-3)
    on_device = kmeans(torch.from_numpy(x).cuda(), 40, seed=0, backend="faiss-gpu")
    assert on_device.info["gpu_device"] == torch.cuda.current_device()
    assert nmi(gpu.labels, on_device.labels) > 0.99


def test_sklearn_backend_is_the_official_call():
    """backend='sklearn' runs scikit-learn's KMeans as the official MMT code did: the same labels,
    and its cluster_centers_ (not the means of the labels) as the centroids."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((12, 8))[rng.integers(0, 12, 300)] + 0.3 * rng.standard_normal((300, 8))).astype(np.float32)
    res = kmeans(torch.from_numpy(x), 12, seed=7, nredo=3, niter=50, backend="sklearn", num_threads=1)
    ref = KMeans(n_clusters=12, n_init=3, max_iter=50, random_state=7).fit(x)
    np.testing.assert_array_equal(res.labels, ref.labels_)
    np.testing.assert_allclose(res.centroids.numpy(), ref.cluster_centers_, rtol=0, atol=1e-6)
    assert res.num_clusters == 12 and res.info["backend"] == "sklearn"
    assert res.info["inertia"] == pytest.approx(ref.inertia_)
    assert resolve_kmeans_backend("auto") != "sklearn"  # only when asked
    with pytest.raises(ValueError, match="num_threads must be >= 1"):  # checked as on the FAISS path
        kmeans(torch.from_numpy(x), 12, backend="sklearn", num_threads=0)
    # as MMT's epochs call it (adapt.cluster_backend=sklearn: the paper configs)
    from fastmmt.cluster import build_clusterer
    epoch = build_clusterer("kmeans", k=12, seed=7, backend="sklearn", nredo=3, niter=50)(torch.from_numpy(x), 5)
    np.testing.assert_array_equal(epoch.labels, ref.labels_)


def test_sklearn_backend_without_sklearn_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # import fails
    with pytest.raises(ClusterError, match="needs scikit-learn"):
        kmeans(np.zeros((10, 2), np.float32), 2, backend="sklearn")


@pytest.mark.gpu
def test_sklearn_backend_takes_cuda_features(data):
    """The paper configs' k-means on CUDA features (a GPU run's teachers): scikit-learn runs on a
    host copy, the labels are the CPU run's and the centroids come back on the features' device."""
    x, _ = data
    cpu = kmeans(torch.from_numpy(x), 40, seed=0, nredo=2, niter=50, backend="sklearn")
    gpu = kmeans(torch.from_numpy(x).cuda(), 40, seed=0, nredo=2, niter=50, backend="sklearn")
    np.testing.assert_array_equal(gpu.labels, cpu.labels)
    assert gpu.centroids.is_cuda
    torch.testing.assert_close(gpu.centroids.cpu(), cpu.centroids, rtol=0, atol=0)
