"""Clustering benchmarks at Market-1501 target size (12,936 x 2048) on this CPU.

pytest-benchmark (``bash scripts/dev.sh bench bench/bench_cluster.py``):
- FAISS k-means (fastmmt) vs scikit-learn KMeans(k-means++, n_init=10), k = 500, with inertia
  and NMI to the generating blobs;
- sparse k-reciprocal Jaccard + eps + DBSCAN (fastmmt) vs the dense reference algorithm (dense
  N x N matrices and per-row loops, as MMT's ``compute_jaccard_dist``) + scikit-learn DBSCAN, with
  each one's peak memory measured in a fresh subprocess (``VmHWM``).
Scaling table (markdown on stdout): ``python bench/bench_cluster.py --scaling``.
Peak memory of one step: ``python bench/bench_cluster.py --peak {sparse,dense,kmeans} N``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

MARKET_N, DIM, K = 12_936, 2048, 500


def blobs(n: int, d: int = DIM, n_blobs: int | None = None, noise: float = 1.0, seed: int = 0):
    """Unit-norm points around ``n_blobs`` random unit centres with uneven blob sizes.

    noise 1.0 puts the noise norm at the centre spacing scale: about 3% of points are closer
    to another blob's centre than to their own, so the clustering is not trivial.
    """
    rng = np.random.default_rng(seed)
    n_blobs = n_blobs or max(2, round(n / 21.5))  # Market: 12,936 images of ~600 blobs
    centres = rng.standard_normal((n_blobs, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = rng.gamma(2.0, 1.0, n_blobs)
    y = rng.choice(n_blobs, size=n, p=w / w.sum())
    x = centres[y] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


# --- the dense reference: the published algorithm with N x N matrices and per-row loops ---------

def _recip(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    fwd = rank[i, : k + 1]
    return fwd[np.where(rank[fwd, : k + 1] == i)[0]]


def dense_jaccard(x: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """Dense k-reciprocal Jaccard distance (float32 N x N), structured like MMT's reference."""
    t = torch.from_numpy(x)
    sq = t.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :]).addmm_(t, t.t(), alpha=-2.0).clamp_(min=0)
    dist.fill_diagonal_(0)
    dist /= dist.max(1, keepdim=True).values
    rank = torch.topk(dist, k1 + 1, dim=1, largest=False).indices.numpy()
    dist = dist.numpy()
    n = len(x)
    kh = int(np.around(k1 / 2))
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        r = _recip(rank, i, k1)
        exp = r
        for c in r:
            rc = _recip(rank, c, kh)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                exp = np.append(exp, rc)
        exp = np.unique(exp)
        w = np.exp(-dist[i, exp])
        v[i, exp] = w / w.sum()
    del dist
    vqe = np.zeros_like(v)
    for s in range(0, n, 1024):
        vqe[s:s + 1024] = v[rank[s:s + 1024, :k2]].mean(1)
    del v
    inv = [np.nonzero(vqe[:, j])[0] for j in range(n)]
    jac = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        tmin = np.zeros(n, dtype=np.float32)
        for j in np.nonzero(vqe[i])[0]:
            tmin[inv[j]] += np.minimum(vqe[i, j], vqe[inv[j], j])
        jac[i] = 1 - tmin / (2 - tmin)
    np.clip(jac, 0, None, out=jac)
    return jac


def dense_pipeline(x: np.ndarray, rho: float = 1.6e-3) -> np.ndarray:
    from sklearn.cluster import DBSCAN
    jac = dense_jaccard(x)
    tri = jac[np.triu_indices(len(x), 1)]
    tri = np.sort(tri[tri > 0])
    eps = float(tri[: int(np.round(rho * tri.size))].mean())
    del tri
    return DBSCAN(eps=eps, min_samples=4, metric="precomputed", n_jobs=1).fit_predict(jac)


def sparse_pipeline(x: np.ndarray, rho: float = 1.6e-3) -> np.ndarray:
    from fastmmt.cluster import dbscan, dbscan_eps_from_rho, k_reciprocal_jaccard
    jac = k_reciprocal_jaccard(torch.from_numpy(x))
    return dbscan(jac, dbscan_eps_from_rho(jac, rho), 4)


def kmeans_fastmmt(x: np.ndarray, k: int) -> np.ndarray:
    from fastmmt.cluster import kmeans
    return kmeans(x, k, seed=0).labels


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss not inherited over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(kind: str, n: int) -> dict:
    """Run one step in a fresh interpreter; its wall time and peak resident memory."""
    out = subprocess.run([sys.executable, __file__, "--peak", kind, str(n)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _peak_main(kind: str, n: int) -> None:
    x, _ = blobs(n)
    base = _vm_hwm_mb()
    t0 = time.perf_counter()
    fn = {"sparse": sparse_pipeline, "dense": dense_pipeline,
          "kmeans": lambda a: kmeans_fastmmt(a, max(2, round(n / 26)))}[kind]
    labels = fn(x)
    sec = time.perf_counter() - t0
    peak = _vm_hwm_mb()
    print(json.dumps({"kind": kind, "n": n, "seconds": round(sec, 2), "peak_rss_mb": round(peak),
                      "data_rss_mb": round(base), "clusters": int(labels.max()) + 1}))


def _scaling_main() -> None:
    print("| N | step | seconds | peak RSS (MB) | RSS before the step (MB) | clusters |")
    print("|---|---|---|---|---|---|")
    for n in (4_000, MARKET_N, 32_621):
        for kind in ("kmeans", "sparse", "dense"):
            if kind == "dense" and n > MARKET_N:
                print(f"| {n} | dense | skipped: 4 N x N float32 matrices = "
                      f"{4 * 4 * n * n / 2**30:.0f} GiB | | | |")
                continue
            r = peak_rss_mb(kind, n)
            print(f"| {n} | {kind} | {r['seconds']} | {r['peak_rss_mb']} | {r['data_rss_mb']} | "
                  f"{r['clusters']} |", flush=True)


# --- pytest-benchmark ---------------------------------------------------------------------------

RESULTS: dict = {}


@pytest.fixture(scope="module")
def market():
    return blobs(MARKET_N)


def test_kmeans_sklearn_reference(benchmark, market):
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi
    x, y = market
    km = benchmark.pedantic(lambda: KMeans(K, init="k-means++", n_init=10, random_state=0).fit(x),
                            rounds=1, iterations=1)
    RESULTS["sklearn"] = {"seconds": benchmark.stats.stats.median, "inertia": float(km.inertia_),
                          "nmi": float(nmi(y, km.labels_))}
    benchmark.extra_info.update(RESULTS["sklearn"])


def test_kmeans_faiss(benchmark, market):
    from sklearn.metrics import normalized_mutual_info_score as nmi
    from fastmmt.cluster import kmeans
    x, y = market
    res = benchmark.pedantic(lambda: kmeans(x, K, seed=0), rounds=3, iterations=1)
    info = {"seconds": benchmark.stats.stats.median, "inertia": res.info["inertia"],
            "nmi": float(nmi(y, res.labels)), "iterations": res.info["iterations"]}
    if "sklearn" in RESULTS:
        ref = RESULTS["sklearn"]
        info.update(speedup_vs_sklearn=ref["seconds"] / info["seconds"],
                    inertia_ratio=info["inertia"] / ref["inertia"], nmi_diff=info["nmi"] - ref["nmi"])
    benchmark.extra_info.update(info)


def test_dbscan_dense_reference(benchmark, market):
    x, _ = market
    labels = benchmark.pedantic(lambda: dense_pipeline(x), rounds=1, iterations=1)
    RESULTS["dense"] = {"seconds": benchmark.stats.stats.median, "labels": labels}
    benchmark.extra_info.update(peak_rss_mb("dense", MARKET_N))


def test_dbscan_sparse(benchmark, market):
    x, _ = market
    labels = benchmark.pedantic(lambda: sparse_pipeline(x), rounds=2, iterations=1)
    info = peak_rss_mb("sparse", MARKET_N)
    info["seconds_in_process"] = benchmark.stats.stats.median
    info["clusters"] = int(labels.max()) + 1
    if "dense" in RESULTS:
        info["speedup_vs_dense"] = RESULTS["dense"]["seconds"] / benchmark.stats.stats.median
        info["labels_equal_dense"] = bool(np.array_equal(labels, RESULTS["dense"]["labels"]))
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak", nargs=2, metavar=("KIND", "N"))
    ap.add_argument("--scaling", action="store_true")
    a = ap.parse_args()
    if a.peak:
        _peak_main(a.peak[0], int(a.peak[1]))
    elif a.scaling:
        _scaling_main()
    else:
        ap.print_help()
