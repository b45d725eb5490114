"""fastmmt.evaluation metrics vs a per-query numpy reference, hand-computed cases and sklearn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from fastmmt.evaluation import evaluate_features, pairwise_sq_euclidean, rank_metrics


def reference_metrics(dist: np.ndarray, qp, gp, qc, gc, max_rank: int = 10):
    """The textbook per-query loop in float64: stable sort, drop same id+camera, rank-based AP."""
    aps, cmc, n = [], np.zeros(max_rank), 0
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i].astype(np.float64), kind="stable")
        keep = ~((gp[order] == qp[i]) & (gc[order] == qc[i]))
        matches = (gp[order] == qp[i])[keep]
        if not matches.any():
            continue
        n += 1
        hits, precisions = 0, []
        for rank, is_match in enumerate(matches, start=1):
            if is_match:
                hits += 1
                precisions.append(hits / rank)
        aps.append(np.mean(precisions))
        first = int(np.flatnonzero(matches)[0])
        if first < max_rank:
            cmc[first:] += 1
    return float(np.mean(aps)), cmc / n, n


def random_problem(nq: int, ng: int, n_ids: int, n_cams: int, seed: int, levels: int | None = None):
    """Random distances (``levels`` distinct values -> many ties) with junk, distractors (0),
    stray -1 ids in the gallery and queries whose id is absent or only under their own camera."""
    rng = np.random.default_rng(seed)
    gp = rng.integers(1, n_ids + 1, ng)
    gp[rng.random(ng) < 0.1] = 0
    gp[rng.random(ng) < 0.03] = -1
    gc = rng.integers(0, n_cams, ng)
    qp = rng.integers(1, n_ids + 4, nq)  # ids above n_ids never appear in the gallery
    qc = rng.integers(0, n_cams, nq)
    dist = rng.random((nq, ng)) if levels is None else rng.integers(0, levels, (nq, ng)) / levels
    return dist, qp, gp, qc, gc


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("levels", [None, 7])
@pytest.mark.parametrize("chunk_size", [None, 1, 13])
def test_matches_numpy_reference(dtype, levels, chunk_size) -> None:
    dist, qp, gp, qc, gc = random_problem(60, 400, 25, 4, seed=3, levels=levels)
    dist = dist.astype(dtype)
    ref_map, ref_cmc, ref_n = reference_metrics(dist, qp, gp, qc, gc)
    assert ref_n < 60  # some queries really are skipped
    r = rank_metrics(dist, qp, gp, qc, gc, ranks=(1, 5, 10), chunk_size=chunk_size)
    assert r.num_valid_queries == ref_n
    assert r.mAP == pytest.approx(ref_map, abs=1e-12)
    np.testing.assert_allclose(r.cmc, ref_cmc, atol=1e-12)
    assert r.ranks == {1: r.cmc[0], 5: r.cmc[4], 10: r.cmc[9]}


def test_signed_zeros_negatives_and_infinities_rank_like_a_stable_sort() -> None:
    dist, qp, gp, qc, gc = random_problem(40, 300, 20, 3, seed=5, levels=5)
    dist = (dist - 0.4).astype(np.float32)  # negative values (as rounding gives for duplicates)
    dist[dist == np.float32(0.0)] = np.where(np.arange((dist == 0).sum()) % 2, -0.0, 0.0)
    dist[:, ::17] = np.inf
    ref = reference_metrics(dist, qp, gp, qc, gc)
    r = rank_metrics(torch.from_numpy(dist), qp, gp, qc, gc)
    assert (r.mAP, r.num_valid_queries) == (pytest.approx(ref[0], abs=1e-12), ref[2])
    np.testing.assert_allclose(r.cmc, ref[1], atol=1e-12)


def test_many_matches_per_query() -> None:
    dist, qp, gp, qc, gc = random_problem(20, 500, 2, 6, seed=8)
    ref = reference_metrics(dist.astype(np.float32), qp, gp, qc, gc)
    r = rank_metrics(dist.astype(np.float32), qp, gp, qc, gc, chunk_size=6)
    assert r.mAP == pytest.approx(ref[0], abs=1e-12) and r.num_valid_queries == ref[2]


def test_hand_computed_case() -> None:
    # gallery:     0 junk(q0)  1 wrong   2 match  3 distractor  4 match  5 junk(q1)
    gp = np.array([1, 2, 1, 0, 1, 3])
    gc = np.array([0, 1, 1, 2, 2, 0])
    qp = np.array([1, 3, 2])
    qc = np.array([0, 0, 0])
    dist = np.array([
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # kept list: wrong, MATCH(rank 2), wrong, MATCH(rank 4)
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # id 3 only under the query's camera: skipped
        [0.9, 0.1, 0.5, 0.6, 0.7, 0.8],  # id 2 at gallery 1, camera 1, ranked first
    ], dtype=np.float32)
    r = rank_metrics(dist, qp, gp, qc, gc, ranks=(1, 2, 3))
    # AP(q0) = (1/2 + 2/4) / 2 = 0.5 ; AP(q2) = 1 ; mAP = 0.75
    assert r.num_valid_queries == 2
    assert r.mAP == pytest.approx(0.75, abs=1e-12)
    np.testing.assert_allclose(r.cmc, [0.5, 1.0, 1.0])
    assert r.ranks == {1: 0.5, 2: 1.0, 3: 1.0}


def test_ties_rank_by_gallery_index_and_differ_from_sklearn() -> None:
    qp, qc, gc = np.array([1]), np.array([0]), np.array([1, 1])
    tie = np.array([[0.5, 0.5]], dtype=np.float32)
    first = rank_metrics(tie, qp, np.array([1, 2]), qc, gc, ranks=(1,))   # match has the lower index
    second = rank_metrics(tie, qp, np.array([2, 1]), qc, gc, ranks=(1,))  # match has the higher index
    assert (first.mAP, first.ranks[1]) == (1.0, 1.0)
    assert (second.mAP, second.ranks[1]) == (0.5, 0.0)
    # sklearn treats the tied pair as one threshold: precision 1/2 at recall 1, whatever the order
    assert average_precision_score([1, 0], [-0.5, -0.5]) == pytest.approx(0.5)
    assert average_precision_score([0, 1], [-0.5, -0.5]) == pytest.approx(0.5)


def test_equals_sklearn_average_precision_without_ties() -> None:
    dist, qp, gp, qc, gc = random_problem(80, 600, 30, 5, seed=11)
    aps = []
    for i in range(len(qp)):
        keep = ~((gp == qp[i]) & (gc == qc[i]))
        y = gp[keep] == qp[i]
        if y.any():
            aps.append(average_precision_score(y, -dist[i, keep]))
    for dtype in (np.float64, np.float32):
        r = rank_metrics(dist.astype(dtype), qp, gp, qc, gc)
        assert r.num_valid_queries == len(aps)
        assert r.mAP == pytest.approx(np.mean(aps), abs=1e-6)


def test_evaluate_features_equals_rank_metrics_on_distances() -> None:
    g = torch.Generator().manual_seed(0)
    qf = torch.nn.functional.normalize(torch.randn(50, 16, generator=g))
    gf = torch.nn.functional.normalize(torch.randn(300, 16, generator=g))
    _, qp, gp, qc, gc = random_problem(50, 300, 10, 3, seed=2)
    direct = rank_metrics(pairwise_sq_euclidean(qf, gf), qp, gp, qc, gc)
    chunked = evaluate_features(qf, gf, torch.as_tensor(qp), gp, qc, list(gc), chunk_size=7)
    assert chunked.mAP == pytest.approx(direct.mAP, abs=1e-12)
    np.testing.assert_allclose(chunked.cmc, direct.cmc)
    ref = reference_metrics((torch.cdist(qf.double(), gf.double()) ** 2).numpy(), qp, gp, qc, gc)
    assert direct.mAP == pytest.approx(ref[0], abs=1e-6)


def test_pairwise_sq_euclidean_matches_float64_cdist() -> None:
    g = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(33, 64, generator=g), torch.randn(71, 64, generator=g)
    d = pairwise_sq_euclidean(qf, gf)
    assert d.dtype == torch.float32 and d.shape == (33, 71)
    ref = torch.cdist(qf.double(), gf.double()) ** 2
    torch.testing.assert_close(d.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pairwise_sq_euclidean(qf.double(), gf.double()), ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(pairwise_sq_euclidean(qf[5:9], gf), d[5:9])
    assert pairwise_sq_euclidean(qf.bfloat16(), gf.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(33, 64\) and \(71, 63\)"):
        pairwise_sq_euclidean(qf, gf[:, :63])


def test_bad_inputs_are_named() -> None:
    dist, qp, gp, qc, gc = random_problem(5, 20, 3, 2, seed=0)
    with pytest.raises(ValueError, match="g_camids must be 1-D of length 20"):
        rank_metrics(dist, qp, gp, qc, gc[:-1])
    with pytest.raises(ValueError, match="q_pids must hold integers"):
        rank_metrics(dist, qp.astype(float), gp, qc, gc)
    with pytest.raises(ValueError, match="2-D floating"):
        rank_metrics(dist[0], qp, gp, qc, gc)
    with pytest.raises(ValueError, match="ranks"):
        rank_metrics(dist, qp, gp, qc, gc, ranks=(0, 5))
    bad = dist.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN in query rows 2..3"):
        rank_metrics(bad, qp, gp, qc, gc, chunk_size=2)
    with pytest.raises(ValueError, match="no query has a true match"):
        rank_metrics(dist, np.full(5, 99), gp, qc, gc)


def test_accepts_strided_numpy_and_tensors_that_require_grad() -> None:
    dist, qp, gp, qc, gc = random_problem(30, 200, 10, 3, seed=4)
    ref = reference_metrics(dist, qp, gp, qc, gc)
    flipped = np.ascontiguousarray(dist[:, ::-1])[:, ::-1]  # negative strides, same values
    assert rank_metrics(flipped, qp, gp, qc, gc).mAP == pytest.approx(ref[0], abs=1e-12)
    t = torch.tensor(dist, dtype=torch.float32, requires_grad=True)
    assert rank_metrics(t, qp, gp, qc, gc).mAP == pytest.approx(ref[0], abs=1e-6)
