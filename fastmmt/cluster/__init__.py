"""Pseudo-label clustering for MMT: FAISS k-means, k-reciprocal Jaccard distance and DBSCAN.

The trainer uses :func:`build_clusterer` (or the two clusterer classes): one object per run,
called every epoch with the averaged teacher features, returning a :class:`ClusterResult`.
"""
from fastmmt.cluster.clusterers import DBSCANClusterer, KMeansClusterer, KnownLabels, build_clusterer
from fastmmt.cluster.dbscan import dbscan, dbscan_eps_from_rho
from fastmmt.cluster.jaccard import SparseJaccard, k_reciprocal_jaccard
from fastmmt.cluster.kmeans import kmeans
from fastmmt.cluster.rerank_compat import compute_jaccard_distance
from fastmmt.cluster.result import ClusterError, ClusterResult

__all__ = [
    "ClusterError", "ClusterResult", "DBSCANClusterer", "KMeansClusterer", "KnownLabels", "SparseJaccard",
    "build_clusterer", "compute_jaccard_distance", "dbscan", "dbscan_eps_from_rho", "k_reciprocal_jaccard", "kmeans",
]
