"""The trainer's interface: one clusterer object per run, called once per epoch."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastmmt.cluster.dbscan import dbscan, dbscan_eps_from_rho
from fastmmt.cluster.jaccard import k_reciprocal_jaccard
from fastmmt.cluster.kmeans import kmeans
from fastmmt.cluster.result import ClusterError, ClusterResult, as_feature_tensor, cluster_means


class KMeansClusterer:
    """MMT's k-means variant: k clusters of the averaged teacher features every epoch.

    The features are clustered as given (the k-means variant does NOT re-normalise ``cf``).
    Every epoch uses the same ``seed``, as the reference's ``KMeans(random_state=seed)`` did.
    ``seed_dim``: the k-means++ seeding's random projection (None: the full space, as scikit-learn;
    see :func:`~fastmmt.cluster.kmeans`).
    """

    def __init__(self, k: int, seed: int = 0, backend: str = "auto", num_threads: int | None = None,
                 niter: int = 100, nredo: int = 1, seed_dim: int | None = 256, progress: bool = False) -> None:
        self.k, self.seed, self.backend, self.num_threads = k, seed, backend, num_threads
        self.niter, self.nredo, self.seed_dim, self.progress = niter, nredo, seed_dim, progress

    def __call__(self, features: torch.Tensor, epoch: int) -> ClusterResult:
        result = kmeans(features, self.k, seed=self.seed, niter=self.niter, nredo=self.nredo, seed_dim=self.seed_dim,
                        backend=self.backend, num_threads=self.num_threads, progress=self.progress)
        result.info["epoch"] = epoch
        return result


class DBSCANClusterer:
    """MMT's DBSCAN variant on the k-reciprocal Jaccard distance of re-normalised features.

    eps is fixed once, at the first call (epoch 0), by :func:`dbscan_eps_from_rho`, and kept for
    every later epoch; :meth:`state_dict` / :meth:`load_state_dict` carry it across a resume.
    Outliers get label -1. A clustering with no cluster at all raises :class:`ClusterError`.
    """

    def __init__(self, k1: int = 20, k2: int = 6, rho: float = 1.6e-3, min_samples: int = 4,
                 seed: int = 0, num_threads: int | None = None, index: str = "flat",
                 progress: bool = False) -> None:
        # seed is accepted for interface symmetry: every step here is deterministic.
        self.k1, self.k2, self.rho, self.min_samples = k1, k2, rho, min_samples
        self.seed, self.num_threads, self.index, self.progress = seed, num_threads, index, progress
        self.eps: float | None = None
        self.eps_epoch: int | None = None

    def __call__(self, features: torch.Tensor, epoch: int) -> ClusterResult:
        t0 = time.perf_counter()
        x = F.normalize(as_feature_tensor(features), dim=1)
        jac = k_reciprocal_jaccard(x, self.k1, self.k2, index=self.index,
                                   num_threads=self.num_threads, progress=self.progress)
        if self.eps is None:
            self.eps = dbscan_eps_from_rho(jac, self.rho)
            self.eps_epoch = epoch
        labels = dbscan(jac, self.eps, self.min_samples)
        num_clusters = int(labels.max()) + 1 if labels.size else 0
        num_outliers = int((labels < 0).sum())
        if num_clusters == 0:
            raise ClusterError(f"DBSCAN found no cluster at epoch {epoch}: all {len(labels)} points are "
                               f"outliers with eps={self.eps:.6g}, min_samples={self.min_samples}")
        info = {"eps": self.eps, "eps_epoch": self.eps_epoch, "num_outliers": num_outliers,
                "jaccard_nnz": jac.nnz, "epoch": epoch, "seconds": time.perf_counter() - t0}
        return ClusterResult(labels=labels, centroids=cluster_means(x, labels, num_clusters),
                             num_clusters=num_clusters, info=info)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to keep the same eps."""
        return {"eps": self.eps, "eps_epoch": self.eps_epoch, "rho": self.rho}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore eps saved by :meth:`state_dict` (None = not fixed yet)."""
        missing = {"eps", "eps_epoch"} - set(state)
        if missing:
            raise KeyError(f"DBSCANClusterer state is missing keys {sorted(missing)}; got {sorted(state)}")
        eps = state["eps"]
        if eps is not None and not (np.isfinite(eps) and eps >= 0):
            raise ClusterError(f"DBSCANClusterer state has an invalid eps {eps!r}")
        self.eps = None if eps is None else float(eps)
        self.eps_epoch = state["eps_epoch"]


class KnownLabels:
    """Pseudo-labels that are given, not found: the same ``labels`` every epoch (any integers;
    negative = excluded, like DBSCAN outliers), renumbered ``0..K-1`` in order of first
    appearance, with the features' cluster means as centroids.

    With the true identities this turns the Stage II trainer into a target-supervised oracle:
    what MMT would reach with perfect pseudo-labels.
    """

    def __init__(self, labels: np.ndarray | list[int], seed: int = 0) -> None:
        # seed is accepted for interface symmetry: nothing here is random.
        raw = np.asarray(labels)
        if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
            raise ClusterError(f"known labels must be a non-empty 1-D integer array, got {raw.dtype} {raw.shape}")
        keep = raw >= 0
        _, first, inverse = np.unique(raw[keep], return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))  # sorted-unique id -> rank of its first appearance
        self.labels = np.full(raw.shape, -1, dtype=np.int64)
        self.labels[keep] = order[inverse]
        self.num_clusters = int(first.size)
        if self.num_clusters == 0:
            raise ClusterError("known labels exclude every sample (all negative)")

    def __call__(self, features: torch.Tensor, epoch: int) -> ClusterResult:
        x = as_feature_tensor(features)
        if len(x) != len(self.labels):
            raise ClusterError(f"{len(x)} feature rows but {len(self.labels)} known labels")
        return ClusterResult(labels=self.labels.copy(), centroids=cluster_means(x, self.labels, self.num_clusters),
                             num_clusters=self.num_clusters, info={"epoch": epoch})


CLUSTERERS = {"kmeans": KMeansClusterer, "dbscan": DBSCANClusterer, "known": KnownLabels}


def build_clusterer(method: str, **kwargs: Any) -> KMeansClusterer | DBSCANClusterer | KnownLabels:
    """``"kmeans"`` (needs ``k``), ``"dbscan"`` or ``"known"`` (needs ``labels``); keyword
    arguments go to the constructor."""
    if method not in CLUSTERERS:
        raise ClusterError(f"unknown clustering method {method!r}; choose one of {sorted(CLUSTERERS)}")
    return CLUSTERERS[method](**kwargs)
