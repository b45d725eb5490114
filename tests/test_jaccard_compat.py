"""compute_jaccard_distance (the faiss_rerank.py drop-in) against the transcription of the original
(tests/memory_reference.py) fed the same k-NN ranks: distances within 1e-6 and identical DBSCAN
labels; bad input raises ClusterError naming the problem. Features are fresh random clustered
points each run (the seed is printed; FASTMMT_TEST_SEED pins it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmmt.cluster import ClusterError, SparseJaccard, dbscan
from fastmmt.cluster.knn import knn
from fastmmt.cluster.rerank_compat import compute_jaccard_distance
from memory_reference import jaccard_ref


def _features(gen: torch.Generator, n: int = 90, d: int = 8, groups: int = 9) -> torch.Tensor:
    centres = torch.randn(groups, d, generator=gen)
    x = centres[torch.randint(0, groups, (n,), generator=gen)] + 0.35 * torch.randn(n, d, generator=gen)
    return F.normalize(x, dim=1)


@pytest.mark.parametrize("k1, k2", [(6, 3), (20, 6), (7, 1), (9, 9)])
def test_matches_transcription(k1, k2, gen):
    x = _features(gen)
    ours = compute_jaccard_distance(x, k1, k2, print_flag=False)
    ref = jaccard_ref(x, knn(x, k1).ids, k1, k2)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-6
    assert ((ours > 0) & (ours < 1)).mean() > 0.05 and (ours == 1).any()  # real structure is compared
    assert np.abs(compute_jaccard_distance(x.double(), k1, k2, print_flag=False) - ref).max() < 1e-6  # torch path
    sparse = compute_jaccard_distance(x, k1, k2, print_flag=False, sparse=True)
    assert isinstance(sparse, SparseJaccard) and np.array_equal(sparse.to_dense(), ours)
    for eps in (0.5, 0.6, 0.7):
        vals = ref[np.triu_indices(len(ref), 1)]
        if np.abs(vals - eps).min() < 1e-5:
            continue  # a pair at the radius: rounding may decide it either way
        labels = dbscan(sparse, eps, min_samples=4)
        assert np.array_equal(labels, dbscan(ref, eps, min_samples=4))


def test_neighbour_count_matters(gen):
    """Zhong's k1 + 1 neighbours (fastmmt's MMT path) give other distances: the comparison above
    sees the original's k1-column search."""
    x = _features(gen)
    ours = compute_jaccard_distance(x, 6, 3, print_flag=False)
    zhong = jaccard_ref(x, knn(x, 7).ids, 6, 3)
    assert np.abs(ours - zhong).max() > 1e-3


def test_float16_matches_transcription(gen):
    x = _features(gen)
    ours = compute_jaccard_distance(x, 6, 3, print_flag=False, use_float16=True)
    ref = jaccard_ref(x, knn(x, 6).ids, 6, 3, mat_type=np.float16)
    assert ours.dtype == np.float16
    assert np.abs(ours.astype(np.float32) - ref.astype(np.float32)).max() < 4e-3


def test_prints_like_the_original(gen, capsys):
    compute_jaccard_distance(_features(gen, n=20), 4, 2)
    out = capsys.readouterr().out
    assert out.startswith("Computing jaccard distance...") and "time cost" in out


@pytest.mark.parametrize("make, match", [
    (lambda x: (x, {"k1": 90}), r"k1 must be in \[1, N - 1\]"),
    (lambda x: (x, {"k1": 0}), r"k1 must be in"),
    (lambda x: (x, {"k1": 5, "k2": 6}), r"k2 must be in \[1, k1\]"),
    (lambda x: (x, {"search_option": 4}), "search_option"),
    (lambda x: (x[:, 0], {}), "2-D"),
    (lambda x: (x.index_put((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"))), {}), "NaN"),
])
def test_bad_input(make, match, gen):
    x, kw = make(_features(gen))
    kw.setdefault("k1", 6)
    kw.setdefault("k2", 3)
    with pytest.raises(ClusterError, match=match):
        compute_jaccard_distance(x, print_flag=False, **kw)


def test_finite_check_sees_every_bad_entry_and_no_false_alarm():
    """The finite check's one-pass sum: +inf and -inf (a NaN sum), a lone NaN, and large finite
    values whose float32 sum overflows (accepted after the entry-wise check)."""
    from fastmmt.cluster.result import as_feature_tensor

    x = torch.ones(6, 4)
    for bad in ([(1, 2, float("inf")), (4, 0, -float("inf"))], [(5, 3, float("nan"))]):
        y = x.clone()
        for r, c, v in bad:
            y[r, c] = v
        with pytest.raises(ClusterError, match=f"NaN/inf values in {len(bad)} of 6 rows"):
            as_feature_tensor(y)
    big = torch.full((6, 4), 3e38)
    assert not torch.isfinite(big.sum())
    assert torch.equal(as_feature_tensor(big), big)
