"""Clustering benchmarks at Market-1501 target size (12,936 x 2048) on this CPU.

pytest-benchmark (``bash scripts/dev.sh bench bench/bench_cluster.py``):
- FAISS k-means (fastmmt, with its default 1 restart / 100 iterations and with the official
  recipe's 10 restarts / 300 iterations) vs scikit-learn KMeans(k-means++, n_init=10), k = 500,
  with inertia and NMI to the generating blobs;
- sparse k-reciprocal Jaccard + eps + DBSCAN (fastmmt) vs the dense published algorithm (N x N
  matrices, full argsort, per-row loops, as Zhong et al.'s re_ranking / MMT's
  ``compute_jaccard_dist``) and vs its stronger top-k variant, each + scikit-learn DBSCAN, with
  each one's peak memory measured in a fresh subprocess (``VmHWM``).
Threads: OMP_NUM_THREADS, when set, also bounds torch and FAISS here (bench/conftest.py would
otherwise give torch every core).
Scaling table (markdown on stdout): ``python bench/bench_cluster.py --scaling``.
Seconds per phase: ``python bench/bench_cluster.py --phases N``.
Peak memory of one step: ``python bench/bench_cluster.py --peak {sparse,dense,dense-topk,kmeans} N``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Iterator

import faiss
import numpy as np
import pytest
import torch

MARKET_N, DIM, K = 12_936, 2048, 500
# Smoke runs: FASTMMT_BENCH_N=1300 scales the pytest-benchmark data (and k = N / 26) down.
if os.environ.get("FASTMMT_BENCH_N"):
    MARKET_N = int(os.environ["FASTMMT_BENCH_N"])
    K = max(2, round(MARKET_N / 26))
THREADS = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
if THREADS:  # bench/conftest.py gives torch every core; OMP_NUM_THREADS=1 means one, for all
    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)


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
# Written from Zhong et al.'s description and the structure of their re_ranking / MMT's
# compute_jaccard_dist: full N x N squared distance divided by its row maximum, the initial rank
# by a FULL argsort of every row, dense float32 V, V' and Jaccard matrices built by per-row
# Python loops, eps by MMT's rule on np.triu of the matrix, scikit-learn DBSCAN (precomputed).
# The reciprocal sets are computed once per point (as MMT does), not once per use (as Zhong's
# code does): cheaper, so the ratio against it is conservative. The N x N distance matrix comes
# from FAISS's pairwise_L2sqr, the same BLAS routine fastmmt's k-NN uses, so the comparison does
# not credit fastmmt with a faster matrix product.
# ``rank="topk"`` is a stronger variant: only the k1+1 nearest of each row, by torch top-k.

DENSE_RANKS = ("argsort", "topk")
RHO, MIN_SAMPLES = 1.6e-3, 4


def _recip(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    fwd = rank[i, : k + 1]
    return fwd[np.where(rank[fwd, : k + 1] == i)[0]]


def dense_phases(x: np.ndarray, out: dict, k1: int = 20, k2: int = 6,
                 rank: str = "argsort") -> Iterator[str]:
    """The dense pipeline, yielding the name of each phase as it ends; labels in out["labels"]."""
    from sklearn.cluster import DBSCAN
    if rank not in DENSE_RANKS:
        raise ValueError(f"rank must be one of {DENSE_RANKS}, got {rank!r}")
    n, d = x.shape
    dist = np.empty((n, n), dtype=np.float32)
    faiss.pairwise_L2sqr(d, n, faiss.swig_ptr(x), n, faiss.swig_ptr(x), faiss.swig_ptr(dist))
    np.clip(dist, 0, None, out=dist)
    np.fill_diagonal(dist, 0)
    dist /= dist.max(axis=1, keepdims=True)
    yield "distance matrix"
    if rank == "argsort":
        initial_rank = np.argsort(dist, axis=1).astype(np.int32)
    else:
        initial_rank = torch.topk(torch.from_numpy(dist), k1 + 1, dim=1, largest=False).indices.numpy()
    yield "initial rank"
    kh = int(np.around(k1 / 2))
    nn_k1 = [_recip(initial_rank, i, k1) for i in range(n)]
    nn_kh = [_recip(initial_rank, i, kh) for i in range(n)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        r = nn_k1[i]
        exp = r
        for c in r:
            rc = nn_kh[c]
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                exp = np.append(exp, rc)
        exp = np.unique(exp)
        w = np.exp(-dist[i, exp])
        v[i, exp] = w / w.sum()
    del dist
    yield "encoding V"
    vqe = np.zeros_like(v)
    for i in range(n):
        vqe[i] = v[initial_rank[i, :k2]].mean(0)
    del v, initial_rank
    yield "query expansion"
    inv = [np.where(vqe[:, j] != 0)[0] for j in range(n)]
    jac = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        tmin = np.zeros(n, dtype=np.float32)
        for j in np.where(vqe[i] != 0)[0]:
            tmin[inv[j]] += np.minimum(vqe[i, j], vqe[inv[j], j])
        jac[i] = 1 - tmin / (2 - tmin)
    jac[jac < 0] = 0
    del vqe, inv
    yield "Jaccard"
    tri = np.triu(jac, 1)
    tri = np.sort(tri[np.nonzero(tri)], axis=None)
    eps = float(tri[: int(np.round(RHO * tri.size))].mean())
    del tri
    yield "eps"
    out["labels"] = DBSCAN(eps=eps, min_samples=MIN_SAMPLES, metric="precomputed", n_jobs=1).fit_predict(jac)
    yield "DBSCAN"


def sparse_phases(x: np.ndarray, out: dict, k1: int = 20, k2: int = 6) -> Iterator[str]:
    """fastmmt's pipeline (the steps of ``k_reciprocal_jaccard``, then eps and DBSCAN), phase by phase."""
    from fastmmt.cluster import dbscan, dbscan_eps_from_rho
    from fastmmt.cluster.encoding import encode, query_expand
    from fastmmt.cluster.jaccard import feature_pair_distance, jaccard_rows
    from fastmmt.cluster.knn import knn
    t = torch.from_numpy(x)
    with torch.no_grad():
        nb = knn(t, k1 + 1)
        yield "k-NN"
        v = encode(nb.ids, feature_pair_distance(t, nb), k1)
        yield "encoding V"
        v = query_expand(v, nb.ids, k2)
        yield "query expansion"
        jac = jaccard_rows(v, len(x))
        yield "Jaccard"
    eps = dbscan_eps_from_rho(jac, RHO)
    yield "eps"
    out["labels"] = dbscan(jac, eps, MIN_SAMPLES)
    yield "DBSCAN"


def timed_phases(phases: Iterator[str]) -> dict[str, float]:
    """Seconds per phase of a phase generator, in order."""
    times, t0 = {}, time.perf_counter()
    for name in phases:
        now = time.perf_counter()
        times[name], t0 = now - t0, now
    return times


def dense_pipeline(x: np.ndarray, rank: str = "argsort") -> np.ndarray:
    out: dict = {}
    timed_phases(dense_phases(x, out, rank=rank))
    return out["labels"]


def sparse_pipeline(x: np.ndarray) -> np.ndarray:
    from fastmmt.cluster import dbscan, dbscan_eps_from_rho, k_reciprocal_jaccard
    jac = k_reciprocal_jaccard(torch.from_numpy(x))
    return dbscan(jac, dbscan_eps_from_rho(jac, RHO), MIN_SAMPLES)


def kmeans_fastmmt(x: np.ndarray, k: int) -> np.ndarray:
    from fastmmt.cluster import kmeans
    return kmeans(x, k, seed=0).labels


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: peak resident, VmRSS: resident now) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mb(kind: str, n: int) -> dict:
    """Run one step in a fresh interpreter; its wall time and peak resident memory."""
    out = subprocess.run([sys.executable, __file__, "--peak", kind, str(n)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _peak_main(kind: str, n: int) -> None:
    """One step on fresh blobs; the peak is measured from after the data generation: the
    generator's float64 temporaries are freed and VmHWM is reset (``clear_refs``), so the
    peak is the step's own, with the float32 features and the libraries resident."""
    x, _ = blobs(n)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    fn = {"sparse": sparse_pipeline, "dense": dense_pipeline,
          "dense-topk": lambda a: dense_pipeline(a, rank="topk"),
          "kmeans": lambda a: kmeans_fastmmt(a, max(2, round(n / 26)))}[kind]
    labels = fn(x)
    sec = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    print(json.dumps({"kind": kind, "n": n, "seconds": round(sec, 2), "peak_rss_mb": round(peak),
                      "start_rss_mb": round(base), "clusters": int(labels.max()) + 1}))


def _scaling_main() -> None:
    print("| N | step | seconds | peak RSS (MB) | RSS at the start of the step (MB) | clusters |")
    print("|---|---|---|---|---|---|")
    for n in (4_000, MARKET_N, 32_621):
        for kind in ("kmeans", "sparse", "dense", "dense-topk"):
            if kind.startswith("dense") and n > MARKET_N:
                print(f"| {n} | {kind} | skipped: 4 N x N float32/int32 matrices = "
                      f"{4 * 4 * n * n / 2**30:.0f} GiB | | | |")
                continue
            r = peak_rss_mb(kind, n)
            print(f"| {n} | {kind} | {r['seconds']} | {r['peak_rss_mb']} | {r['start_rss_mb']} | "
                  f"{r['clusters']} |", flush=True)


def _phases_main(n: int) -> None:
    """Seconds per phase of the sparse pipeline and both dense variants, as a markdown table."""
    x, _ = blobs(n)
    cols = {"sparse": timed_phases(sparse_phases(x, {}))}
    for rank in DENSE_RANKS:
        cols[f"dense-{rank}"] = timed_phases(dense_phases(x, {}, rank=rank))
    place = {}  # a phase's row: the latest position it has in any pipeline, ties by appearance
    for c in cols.values():
        for i, p in enumerate(c):
            place[p] = max(place.get(p, 0), i)
    names = sorted(place, key=place.get)
    print("| phase | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for p in names + ["total"]:
        vals = [sum(c.values()) if p == "total" else c.get(p) for c in cols.values()]
        print(f"| {p} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")


def _rerank_main(num_query: int, num_gallery: int, d: int) -> None:
    """k-reciprocal re-ranking of blob features at a test-set size (MSMT17: 11,659 x 82,161),
    streamed in query blocks; wall time, the step's peak memory over its start, and rank-1
    before/after (queries and gallery share blobs). The dense algorithm would hold several
    (Nq+Ng)^2 matrices: 4 x 35 GB at MSMT17's size, so it has no row here."""
    from fastmmt.evaluation.reranking import iter_re_ranking_blocks

    x, y = blobs(num_query + num_gallery, d=d)
    q, g, qy, gy = x[:num_query], x[num_query:], y[:num_query], y[num_query:]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    hits = 0
    for s, blk in iter_re_ranking_blocks(torch.from_numpy(q), torch.from_numpy(g), progress=True):
        hits += int((gy[blk.argmin(1)] == qy[s:s + len(blk)]).sum())
    sec = time.perf_counter() - t0
    plain = sum(int((gy[((g @ q[s:s + 4096].T).argmax(0))] == qy[s:s + 4096]).sum())
                for s in range(0, num_query, 4096))
    print(json.dumps({"num_query": num_query, "num_gallery": num_gallery, "dim": d, "seconds": round(sec, 1),
                      "step_peak_mb": round(_status_mb("VmHWM") - base), "start_rss_mb": round(base),
                      "rank1_plain": round(plain / num_query, 4), "rank1_reranked": round(hits / num_query, 4)}))


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


# (restarts, iteration limit): fastmmt's default (the demo's), and the official recipe's values
# (scikit-learn's n_init=10, max_iter=300) that the paper configs set.
KMEANS_SETTINGS = {"default": (1, 100), "official": (10, 300)}


@pytest.mark.parametrize("setting", sorted(KMEANS_SETTINGS))
def test_kmeans_faiss(benchmark, market, setting):
    from sklearn.metrics import normalized_mutual_info_score as nmi
    from fastmmt.cluster import kmeans
    x, y = market
    nredo, niter = KMEANS_SETTINGS[setting]
    rounds = 3 if nredo == 1 else 1
    res = benchmark.pedantic(lambda: kmeans(x, K, seed=0, nredo=nredo, niter=niter), rounds=rounds, iterations=1)
    info = {"nredo": nredo, "niter": niter, "seconds": benchmark.stats.stats.median,
            "inertia": res.info["inertia"], "nmi": float(nmi(y, res.labels)), "iterations": res.info["iterations"]}
    if "sklearn" in RESULTS:
        ref = RESULTS["sklearn"]
        info.update(speedup_vs_sklearn=ref["seconds"] / info["seconds"],
                    inertia_ratio=info["inertia"] / ref["inertia"], nmi_diff=info["nmi"] - ref["nmi"])
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("rank", DENSE_RANKS)
def test_dbscan_dense_reference(benchmark, market, rank):
    x, _ = market
    labels = benchmark.pedantic(lambda: dense_pipeline(x, rank), rounds=1, iterations=1)
    RESULTS[rank] = {"seconds": benchmark.stats.stats.median, "labels": labels}
    info = peak_rss_mb("dense" if rank == "argsort" else "dense-topk", MARKET_N)
    info.update(threads=torch.get_num_threads(), clusters_in_process=int(labels.max()) + 1)
    benchmark.extra_info.update(info)


def test_dbscan_sparse(benchmark, market):
    x, _ = market
    labels = benchmark.pedantic(lambda: sparse_pipeline(x), rounds=3, iterations=1)
    info = peak_rss_mb("sparse", MARKET_N)
    info.update(threads=torch.get_num_threads(), seconds_in_process=benchmark.stats.stats.median,
                clusters_in_process=int(labels.max()) + 1)
    for rank, ref in RESULTS.items():
        if rank in DENSE_RANKS:
            info[f"speedup_vs_dense_{rank}"] = ref["seconds"] / benchmark.stats.stats.median
            info[f"labels_equal_dense_{rank}"] = bool(np.array_equal(labels, ref["labels"]))
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak", nargs=2, metavar=("KIND", "N"))
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--phases", type=int, metavar="N")
    ap.add_argument("--rerank", nargs=3, type=int, metavar=("NUM_QUERY", "NUM_GALLERY", "DIM"))
    a = ap.parse_args()
    if a.peak:
        _peak_main(a.peak[0], int(a.peak[1]))
    elif a.scaling:
        _scaling_main()
    elif a.phases:
        _phases_main(a.phases)
    elif a.rerank:
        _rerank_main(*a.rerank)
    else:
        ap.print_help()
