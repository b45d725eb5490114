"""k-means with FAISS: k-means++ seeding, several restarts, exact L2 assignment.

The reference MMT ran scikit-learn's KMeans (k-means++, 10 restarts). fastmmt runs FAISS's
Lloyd iterations with its k-means++ initialisation and keeps the best of ``nredo`` restarts; on a
GPU (``faiss.get_num_gpus() > 0``) the assignment step runs on a ``GpuIndexFlatL2``.
"""
from __future__ import annotations

import time

import faiss
import numpy as np
import torch

from fastmmt.cluster._threads import limited_threads
from fastmmt.cluster.result import ClusterError, ClusterResult, as_feature_tensor, cluster_means

KMEANS_BACKENDS = ("auto", "faiss", "faiss-gpu")
KMEANS_INITS = {"k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
                "random": faiss.ClusteringInitMethod_RANDOM}


def resolve_kmeans_backend(backend: str) -> str:
    """``auto`` -> ``faiss-gpu`` when FAISS sees a GPU, else ``faiss`` (CPU)."""
    if backend not in KMEANS_BACKENDS:
        raise ClusterError(f"unknown k-means backend {backend!r}; choose one of {KMEANS_BACKENDS}")
    if backend == "auto":
        return "faiss-gpu" if faiss.get_num_gpus() > 0 else "faiss"
    if backend == "faiss-gpu" and faiss.get_num_gpus() == 0:
        raise ClusterError("k-means backend 'faiss-gpu' requested but faiss.get_num_gpus() == 0")
    return backend


def _flat_l2_index(backend: str, d: int) -> tuple[faiss.Index, object]:
    """Exact L2 index for the assignment step (and the GPU resources keeping it alive)."""
    if backend == "faiss-gpu":
        # faiss.Kmeans(gpu=True) silently trains on the CPU without a GPU; build the index here.
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = 0
        return faiss.GpuIndexFlatL2(res, d, cfg), res
    return faiss.IndexFlatL2(d), None


def kmeans(
    features: torch.Tensor | np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 100,
    nredo: int = 1,
    init: str = "k-means++",
    tol: float = 1e-4,
    backend: str = "auto",
    num_threads: int | None = None,
    progress: bool = False,
) -> ClusterResult:
    """Cluster ``features`` (N, D) into ``k`` groups; labels and centroids from the final assignment.

    Lloyd iterations stop after ``niter`` or when the objective improves by less than ``tol``
    (relative); the best of ``nredo`` restarts is kept. Centroids are the means of the final
    clusters. FAISS splits empty clusters during training; if the final assignment still leaves
    a cluster empty it is dropped and the ids are compacted (``info["empty_clusters"]``).
    """
    t0 = time.perf_counter()
    x = as_feature_tensor(features)
    n, d = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusterError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ClusterError(f"k-means with k={k} clusters needs at least k samples, got N={n}")
    if init not in KMEANS_INITS:
        raise ClusterError(f"unknown k-means init {init!r}; choose one of {sorted(KMEANS_INITS)}")
    if niter < 1 or nredo < 1:
        raise ClusterError(f"niter and nredo must be >= 1, got niter={niter}, nredo={nredo}")
    backend = resolve_kmeans_backend(backend)
    xs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)

    cp = faiss.ClusteringParameters()
    cp.niter, cp.nredo, cp.seed = int(niter), int(nredo), int(seed)
    cp.init_method = KMEANS_INITS[init]
    cp.early_stop_threshold = float(tol)
    cp.max_points_per_centroid = n  # never subsample: every point takes part
    cp.min_points_per_centroid = 1  # re-ID has ~26 images per centroid: no warning spam
    cp.verbose = bool(progress)
    clus = faiss.Clustering(d, int(k), cp)
    index, _res = _flat_l2_index(backend, d)
    with limited_threads(num_threads):
        clus.train(xs, index)
        centroids = faiss.vector_float_to_array(clus.centroids).reshape(int(k), d)
        index.reset()
        index.add(centroids)
        _, assign = index.search(xs, 1)
    stats = clus.iteration_stats
    iterations = stats.size()
    labels, num_empty = _compact(assign[:, 0].astype(np.int64), int(k))
    num_clusters = int(k) - num_empty
    means = cluster_means(x, labels, num_clusters)
    diff = x.to(torch.float64) - means.to(x.device, torch.float64)[torch.as_tensor(labels, device=x.device)]
    inertia = float(diff.pow(2).sum())
    info = {"inertia": inertia, "backend": backend, "iterations": iterations, "niter": niter,
            "nredo": nredo, "empty_clusters": num_empty, "seconds": time.perf_counter() - t0}
    return ClusterResult(labels=labels, centroids=means, num_clusters=num_clusters, info=info)


def _compact(labels: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Renumber labels to 0..m-1 (order kept) when some of the k ids are unused."""
    used = np.bincount(labels, minlength=k) > 0
    num_empty = int(k - used.sum())
    if num_empty == 0:
        return labels, 0
    new_id = np.cumsum(used) - 1
    return new_id[labels].astype(np.int64), num_empty
