"""k-means with FAISS: greedy k-means++ seeding, restarts, exact L2 assignment.

The reference MMT ran scikit-learn's KMeans (k-means++, 10 restarts). fastmmt seeds with greedy
k-means++ (:mod:`fastmmt.cluster.seeding`), runs FAISS's Lloyd iterations and keeps the best of
``nredo`` restarts; on a GPU (``faiss.get_num_gpus() > 0``) the assignment step runs on a
``GpuIndexFlatL2`` on the features' CUDA device (else torch's current device), with one
``StandardGpuResources`` per device for the whole process (each one reserves scratch memory).

Features may be torch tensors on any device (or numpy arrays). Seeding, the final assignment
(through FAISS's torch interop, ``faiss.contrib.torch_utils``) and the cluster means run where
the features are; FAISS's Lloyd iterations (``faiss.Clustering.train``) read the points on the
host even with a GPU index, so CUDA features are copied to the host once for them.
"""
from __future__ import annotations

import functools
import time

import faiss
import faiss.contrib.torch_utils  # noqa: F401 - FAISS indexes take torch tensors (CPU or CUDA)
import numpy as np
import torch

from fastmmt.cluster._threads import limited_threads
from fastmmt.cluster.result import ClusterError, ClusterResult, as_feature_tensor, cluster_means
from fastmmt.cluster.seeding import kmeans_plusplus

KMEANS_BACKENDS = ("auto", "faiss", "faiss-gpu", "sklearn")
KMEANS_INITS = ("k-means++", "random")


def resolve_kmeans_backend(backend: str) -> str:
    """``auto`` -> ``faiss-gpu`` when FAISS sees a GPU, else ``faiss`` (CPU). ``sklearn`` (only when
    asked; the paper configs do): scikit-learn's ``KMeans``, the official MMT code's clustering."""
    if backend not in KMEANS_BACKENDS:
        raise ClusterError(f"unknown k-means backend {backend!r}; choose one of {KMEANS_BACKENDS}")
    if backend == "auto":
        return "faiss-gpu" if faiss.get_num_gpus() > 0 else "faiss"
    if backend == "faiss-gpu" and faiss.get_num_gpus() == 0:
        raise ClusterError("k-means backend 'faiss-gpu' requested but faiss.get_num_gpus() == 0")
    return backend


@functools.lru_cache(maxsize=None)
def gpu_resources(device: int):
    """The process's ``faiss.StandardGpuResources`` for CUDA ``device`` (created on first use)."""
    return faiss.StandardGpuResources()


def gpu_device(x: torch.Tensor) -> int:
    """The CUDA device FAISS should use for ``x``: its own, else torch's current device."""
    if x.is_cuda:
        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _flat_l2_index(backend: str, d: int, device: int = 0) -> faiss.Index:
    """Exact L2 index for the assignment step (on CUDA ``device`` for ``faiss-gpu``)."""
    if backend == "faiss-gpu":
        # faiss.Kmeans(gpu=True) silently trains on the CPU without a GPU; build the index here.
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = device
        return faiss.GpuIndexFlatL2(gpu_resources(device), d, cfg)
    return faiss.IndexFlatL2(d)


def kmeans(
    features: torch.Tensor | np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 100,
    nredo: int = 1,
    init: str = "k-means++",
    seed_dim: int | None = 256,
    backend: str = "auto",
    num_threads: int | None = None,
    progress: bool = False,
) -> ClusterResult:
    """Cluster ``features`` (N, D) into ``k`` groups; labels and centroids from the final assignment.

    ``init``: ``"k-means++"`` (greedy, measured in a ``seed_dim`` random projection; None = in
    the full space) or ``"random"`` (FAISS's random points). FAISS's Lloyd iterations run until
    its convergence check stops them, at most ``niter``; the best of ``nredo`` restarts (their
    seeds from :func:`restart_seeds`) is kept. Centroids are the means of the final clusters. FAISS
    splits empty clusters during training; if the final assignment still leaves a cluster
    empty it is dropped and the ids are compacted (``info["empty_clusters"]``).
    """
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    n, d = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusterError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ClusterError(f"k-means with k={k} clusters needs at least k samples, got N={n}")
    if init not in KMEANS_INITS:
        raise ClusterError(f"unknown k-means init {init!r}; choose one of {KMEANS_INITS}")
    if niter < 1 or nredo < 1:
        raise ClusterError(f"niter and nredo must be >= 1, got niter={niter}, nredo={nredo}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ClusterError(f"the k-means seed must be a non-negative integer, got {seed!r}")
    backend = resolve_kmeans_backend(backend)
    xs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    if backend == "sklearn":
        return _kmeans_sklearn(x, xs, int(k), seed, int(niter), int(nredo), init, num_threads, t0)

    device = gpu_device(x) if backend == "faiss-gpu" else None
    index = _flat_l2_index(backend, d, device or 0)
    best, iterations = None, 0
    with limited_threads(num_threads), torch.no_grad():
        for redo_seed in restart_seeds(seed, int(nredo)):
            start = xs[kmeans_plusplus(x, int(k), redo_seed, seed_dim).cpu().numpy()] if init == "k-means++" else None
            clus = lloyd(xs, int(k), redo_seed, int(niter), start, index, progress)
            stats = clus.iteration_stats
            iterations += stats.size()
            obj = stats.at(stats.size() - 1).obj
            if best is None or obj < best[0]:
                best = (obj, faiss.vector_float_to_array(clus.centroids).reshape(int(k), d))
        index.reset()
        index.add(best[1])
        _, assign = index.search(_index_input(x, backend), 1)
    labels, num_empty = _compact(assign[:, 0].cpu().numpy().astype(np.int64), int(k))
    num_clusters = int(k) - num_empty
    means = cluster_means(x, labels, num_clusters)
    diff = x.to(torch.float64) - means.to(x.device, torch.float64)[torch.as_tensor(labels, device=x.device)]
    inertia = float(diff.pow(2).sum())
    info = {"inertia": inertia, "backend": backend, "iterations": iterations, "init": init,
            "nredo": nredo, "empty_clusters": num_empty, "seconds": time.perf_counter() - t0}
    if device is not None:
        info["gpu_device"] = device
    return ClusterResult(labels=labels, centroids=means, num_clusters=num_clusters, info=info)


def restart_seeds(seed: int, nredo: int) -> list[int]:
    """The seeds of the ``nredo`` restarts of a run with ``seed``: drawn from a generator seeded with
    ``seed``, so runs with different seeds share no restart (consecutive seeds ``seed + r`` made
    runs with seeds 1 and 2 share nine of ten restarts, and often the same clustering).
    ``nredo`` restarts are the first of ``nredo + 1``'s."""
    return [int(s) for s in np.random.default_rng(int(seed)).integers(0, 2**31 - 1, size=int(nredo))]


def _kmeans_sklearn(x: torch.Tensor, xs: np.ndarray, k: int, seed: int, niter: int, nredo: int, init: str,
                    num_threads: int | None, t0: float) -> ClusterResult:
    """scikit-learn's ``KMeans(k, init, n_init=nredo, max_iter=niter, random_state=seed)``, as the
    official MMT code calls it (10 restarts, 300 iterations; ``seed_dim`` does not apply): its
    labels, and its ``cluster_centers_`` as the centroids (what the official code copies into the
    classifiers)."""
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits  # scikit-learn's own dependency
    except ImportError:
        raise ClusterError("k-means backend 'sklearn' needs scikit-learn (pip install scikit-learn)") from None
    # torch's and FAISS's threads as the FAISS path bounds them (and num_threads checked alike);
    # scikit-learn's OpenMP and BLAS pools through threadpoolctl (None: unchanged)
    with limited_threads(num_threads), threadpool_limits(limits=num_threads):
        km = KMeans(n_clusters=k, init=init, n_init=nredo, max_iter=niter, random_state=seed).fit(xs)
    labels, num_empty = _compact(km.labels_.astype(np.int64), k)
    centres = torch.from_numpy(km.cluster_centers_[np.unique(km.labels_)].astype(np.float32)).to(x.device)
    info = {"inertia": float(km.inertia_), "backend": "sklearn", "iterations": int(km.n_iter_), "init": init,
            "nredo": nredo, "empty_clusters": num_empty, "seconds": time.perf_counter() - t0}
    return ClusterResult(labels=labels, centroids=centres, num_clusters=k - num_empty, info=info)


def _index_input(x: torch.Tensor, backend: str) -> torch.Tensor:
    """``x`` as FAISS's torch interop takes it: float32 and contiguous; CUDA features stay on
    their device for a GPU index (which also takes host memory), anything else goes to the CPU.
    No copy when ``x`` is already so."""
    device = x.device if backend == "faiss-gpu" and x.is_cuda else torch.device("cpu")
    return x.detach().to(device=device, dtype=torch.float32).contiguous()


def lloyd(xs: np.ndarray, k: int, seed: int, niter: int, start: np.ndarray | None, index: faiss.Index,
          progress: bool = False) -> faiss.Clustering:
    """One FAISS k-means run on ``xs`` (N, D) float32 as :func:`kmeans` sets it up, from the
    ``start`` centroids (k, D), or from FAISS's random points (``seed``) when None."""
    cp = faiss.ClusteringParameters()
    cp.niter, cp.nredo, cp.seed = niter, 1, seed
    cp.max_points_per_centroid = xs.shape[0]  # never subsample: every point takes part
    cp.min_points_per_centroid = 1  # re-ID has ~26 images per centroid: no warning spam
    cp.verbose = progress
    clus = faiss.Clustering(xs.shape[1], k, cp)
    if start is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(start, dtype=np.float32).ravel(), clus.centroids)
    index.reset()
    clus.train(xs, index)
    return clus


def _compact(labels: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Renumber labels to 0..m-1 (order kept) when some of the k ids are unused."""
    used = np.bincount(labels, minlength=k) > 0
    num_empty = int(k - used.sum())
    if num_empty == 0:
        return labels, 0
    new_id = np.cumsum(used) - 1
    return new_id[labels].astype(np.int64), num_empty
