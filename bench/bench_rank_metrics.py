"""mAP/CMC at Market-1501 scale: fastmmt.rank_metrics vs the original per-query numpy/sklearn loop.

Run: .venv/bin/python -m pytest bench/bench_rank_metrics.py -q --benchmark-columns=min,median,mean,rounds
The reference (argsort per query + sklearn ``average_precision_score`` per query, as the
original MMT / open-reid evaluation does) is timed on the first ``REF_QUERIES`` queries and
scaled linearly to all 3,368 (its cost is the same for every query).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from fastmmt.evaluation import evaluate_features, pairwise_sq_euclidean, rank_metrics

NQ, NG, IDS, CAMS, DIM = 3368, 15913, 751, 6, 256
DISTRACTORS = 2793  # Market-1501's gallery: 15,913 images after junk removal, 2,793 of id 0
REF_QUERIES = 400
NOISE = 2.0  # per-dimension noise vs unit-variance id centres: mAP in the tens of percent


@pytest.fixture(scope="module")
def market():
    """Random id-clustered unit features (so matches rank high, as with a trained model)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((IDS + 1, DIM)).astype(np.float32)
    q_pids = rng.integers(1, IDS + 1, NQ)
    g_pids = np.concatenate([rng.integers(1, IDS + 1, NG - DISTRACTORS), np.zeros(DISTRACTORS, np.int64)])
    q_cams, g_cams = rng.integers(0, CAMS, NQ), rng.integers(0, CAMS, NG)

    def feats(pids: np.ndarray) -> torch.Tensor:
        x = centers[pids] + NOISE * rng.standard_normal((len(pids), DIM)).astype(np.float32)
        return torch.nn.functional.normalize(torch.from_numpy(x))

    qf, gf = feats(q_pids), feats(g_pids)
    return dict(qf=qf, gf=gf, dist=pairwise_sq_euclidean(qf, gf), q_pids=q_pids, g_pids=g_pids,
                q_cams=q_cams, g_cams=g_cams)


def reference_loop(distmat: np.ndarray, q_pids, g_pids, q_cams, g_cams, topk: int = 10):
    """The original per-query evaluation: numpy argsort + sklearn AP + first-match CMC."""
    aps, cmc, valid_q = [], np.zeros(topk), 0
    for i in range(distmat.shape[0]):
        indices = np.argsort(distmat[i])
        matches = g_pids[indices] == q_pids[i]
        valid = (g_pids[indices] != q_pids[i]) | (g_cams[indices] != q_cams[i])
        y_true = matches[valid]
        if not np.any(y_true):
            continue
        aps.append(average_precision_score(y_true, -distmat[i][indices][valid]))
        first = np.nonzero(y_true)[0][0]
        if first < topk:
            cmc[first:] += 1
        valid_q += 1
    return float(np.mean(aps)), cmc / valid_q


@pytest.fixture(scope="module")
def reference(market):
    """Seconds per query of the reference loop (timed once, on the subset) and its mAP there."""
    d = market["dist"].numpy()
    args = (d[:REF_QUERIES], market["q_pids"][:REF_QUERIES], market["g_pids"], market["q_cams"][:REF_QUERIES],
            market["g_cams"])
    t0 = time.perf_counter()
    mAP, _ = reference_loop(*args)
    return dict(per_query=(time.perf_counter() - t0) / REF_QUERIES, mAP=mAP)


def _report(benchmark, reference, market, result) -> None:
    ref_full = reference["per_query"] * NQ
    ours = benchmark.stats.stats.median
    benchmark.extra_info.update(
        reference_seconds_scaled=round(ref_full, 3), reference_queries_timed=REF_QUERIES,
        fastmmt_seconds=round(ours, 3), speedup=round(ref_full / ours, 1), mAP=round(result.mAP, 4),
        rank1=round(float(result.cmc[0]), 4))
    sub = rank_metrics(market["dist"][:REF_QUERIES], market["q_pids"][:REF_QUERIES], market["g_pids"],
                       market["q_cams"][:REF_QUERIES], market["g_cams"])
    # same quantity as the reference (up to sklearn's tie rule on rare float32 ties)
    assert abs(sub.mAP - reference["mAP"]) < 1e-3


def test_rank_metrics_float32(benchmark, market, reference) -> None:
    m = market
    result = benchmark.pedantic(rank_metrics, args=(m["dist"], m["q_pids"], m["g_pids"], m["q_cams"],
                                                    m["g_cams"]), rounds=3, iterations=1)
    _report(benchmark, reference, market, result)


def test_rank_metrics_float64_sort_path(benchmark, market, reference) -> None:
    m = market
    dist = m["dist"].double()
    result = benchmark.pedantic(rank_metrics, args=(dist, m["q_pids"], m["g_pids"], m["q_cams"],
                                                    m["g_cams"]), rounds=2, iterations=1)
    _report(benchmark, reference, market, result)


def test_evaluate_features_with_distances(benchmark, market, reference) -> None:
    m = market
    result = benchmark.pedantic(evaluate_features, args=(m["qf"], m["gf"], m["q_pids"], m["g_pids"],
                                                         m["q_cams"], m["g_cams"]), rounds=3, iterations=1)
    _report(benchmark, reference, market, result)
