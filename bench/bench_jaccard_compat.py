"""compute_jaccard_distance (the faiss_rerank.py drop-in): time and peak memory against the
transcription of the original, each in its own process (peak memory is the process's max RSS).

The original side is faiss_rerank.compute_jaccard_distance with search_option=3 (FAISS
IndexFlatL2 on the CPU, k1 neighbours) and the transcription in tests/memory_reference.py for the
rest (its dense N x N arrays and per-image loops). Features: synthetic, L2-normalised, D 2048,
clustered (17 images per identity, like Market-1501's 12,936 training images of 751 people).

Large runs, one at a time:
  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_jaccard_compat.py --impl original --n 12936 --save /tmp/o.npz
  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_jaccard_compat.py --impl fastmmt --n 12936 --save /tmp/f.npz
  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_jaccard_compat.py --impl fastmmt-sparse --n 32621
  .venv/bin/python bench/bench_jaccard_compat.py --compare /tmp/o.npz /tmp/f.npz
Each prints one JSON line: seconds (and the k-NN search's share of them), the process's peak RSS (GiB; taken before ``--save``), the
peak before the call (imports and feature generation) and the difference.
``--save`` stores the first 200 rows of the distances and DBSCAN labels (eps 0.6, min_samples 4,
Cluster Contrast's defaults) for ``--compare``. pytest runs both sides at N 2,000.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("original", "fastmmt", "fastmmt-sparse")
K1, K2, EPS, MIN_SAMPLES = 20, 6, 0.6, 4
SEARCH_SECONDS: list[float] = []


def features(n: int, d: int = 2048, seed: int = 0, chunk: int = 4096) -> torch.Tensor:
    """Clustered L2-normalised rows, built in chunks (no N x D temporaries beside the result)."""
    g = torch.Generator().manual_seed(seed)
    ids = max(1, n // 17)
    centres = torch.randn(ids, d, generator=g)
    owner = torch.randint(0, ids, (n,), generator=g)
    x = torch.empty(n, d)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x[s:e] = F.normalize(centres[owner[s:e]] + 0.9 * torch.randn(e - s, d, generator=g), dim=1)
    return x


def prepare(impl: str):
    """The function to time, its modules imported (their memory is not the algorithm's)."""
    if impl == "original":
        sys.path.insert(0, str(ROOT / "tests"))
        from memory_reference import jaccard_ref

        def run(x: torch.Tensor):
            t0 = time.perf_counter()
            index = faiss.IndexFlatL2(x.shape[1])
            index.add(x.numpy())
            _, initial_rank = index.search(x.numpy(), K1)
            SEARCH_SECONDS.append(time.perf_counter() - t0)
            return jaccard_ref(x, initial_rank, K1, K2)

        return run
    from fastmmt.cluster import compute_jaccard_distance, rerank_compat

    knn = rerank_compat.knn

    def timed_knn(*args, **kwargs):  # the k-NN search's share, as on the original side
        t0 = time.perf_counter()
        out = knn(*args, **kwargs)
        SEARCH_SECONDS.append(time.perf_counter() - t0)
        return out

    rerank_compat.knn = timed_knn
    return lambda x: compute_jaccard_distance(x, K1, K2, print_flag=False, search_option=3,
                                              sparse=impl == "fastmmt-sparse")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def measure(impl: str, n: int, save: str | None = None, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    run = prepare(impl)
    x = features(n)
    base = _rss_gb()
    t0 = time.perf_counter()
    out = run(x)
    seconds = time.perf_counter() - t0
    peak = _rss_gb()
    if save:
        from fastmmt.cluster import dbscan
        from fastmmt.cluster.jaccard import SparseJaccard

        if isinstance(out, SparseJaccard):  # the first rows without a dense copy of the rest
            head = np.ones((min(200, n), n), dtype=np.float32)
            for r in range(len(head)):
                cols, dist = out.row(r)
                head[r, cols] = dist
        else:
            head = np.asarray(out[:200])
        np.savez(save, head=head, labels=dbscan(out, EPS, MIN_SAMPLES))
    return {"impl": impl, "n": n, "seconds": round(seconds, 2), "knn_search_seconds": round(sum(SEARCH_SECONDS), 2),
            "peak_rss_gb": round(peak, 3),
            "rss_before_call_gb": round(base, 3),
            "peak_over_features_gb": round(peak - base, 3), "threads": torch.get_num_threads()}


def compare(a: str, b: str) -> dict:
    za, zb = np.load(a), np.load(b)
    return {"max_abs_diff_first_rows": float(np.abs(za["head"] - zb["head"]).max()),
            "dbscan_labels_identical": bool(np.array_equal(za["labels"], zb["labels"])),
            "clusters": int(za["labels"].max()) + 1, "outliers": int((za["labels"] < 0).sum())}


def _in_subprocess(impl: str, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--impl", impl, "--n", str(n)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_jaccard_small(benchmark):
    """Both sides at N 2,000, each in a fresh process; ratios in extra_info."""
    results = {}
    benchmark.group = "compute_jaccard_distance N=2000"

    def run():
        results.update({impl: _in_subprocess(impl, 2000) for impl in IMPLS})

    benchmark.pedantic(run, rounds=1, iterations=1)
    o = results["original"]
    benchmark.extra_info.update(results=results)
    for impl in IMPLS[1:]:
        benchmark.extra_info[f"{impl}_speedup"] = o["seconds"] / results[impl]["seconds"]
        benchmark.extra_info[f"{impl}_peak_ratio"] = results[impl]["peak_over_features_gb"] / o["peak_over_features_gb"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLS)
    parser.add_argument("--n", type=int, default=12_936)
    parser.add_argument("--save")
    parser.add_argument("--compare", nargs=2)
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads, both sides alike")
    args = parser.parse_args()
    print(json.dumps(compare(*args.compare) if args.compare else measure(args.impl, args.n, args.save, args.threads)))
