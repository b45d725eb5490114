"""Sparse k-reciprocal Jaccard distance vs the dense published algorithm (float64, in tests)."""
import numpy as np
import pytest
import torch

from fastmmt.cluster import ClusterError, SparseJaccard, k_reciprocal_jaccard
from fastmmt.cluster.encoding import encode, query_expand
from fastmmt.cluster.jaccard import feature_pair_distance, jaccard_rows
from fastmmt.cluster.knn import knn_exact, knn_hnsw, pair_sq_distances, sq_norms
from test_cluster_reference import (_hand_case, dense_encoding, dense_jaccard,
                                    dense_sq_euclidean)


def blobs(n, d, centers, noise, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    y = rng.integers(0, centers, n)
    x = c[y] + noise * rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


@pytest.fixture(scope="module")
def data():
    x, _ = blobs(180, 24, 12, 0.8, seed=1)
    _, _, vq = dense_encoding(dense_sq_euclidean(x), 20, 6)
    return x, dense_jaccard(vq)


def test_sparse_equals_dense_reference(data):
    x, ref = data
    jac = k_reciprocal_jaccard(torch.from_numpy(x), 20, 6)
    assert isinstance(jac, SparseJaccard)
    dense = jac.to_dense()
    np.testing.assert_allclose(dense, ref, atol=1e-5)
    # the support is exactly the set of pairs with Jaccard < 1, and each row is sorted
    assert jac.nnz == int((ref < 1).sum())
    for r in (0, 57, 179):
        ids, _ = jac.row(r)
        assert np.all(np.diff(ids) > 0)
    assert np.all(np.diag(dense) == 0)


def test_dense_option_and_numpy_input(data):
    x, ref = data
    out = k_reciprocal_jaccard(x, 20, 6, dense=True, num_threads=1)
    assert out.shape == (180, 180) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("k1,k2", [(4, 1), (7, 3), (10, 11)])
def test_other_k(k1, k2):
    x, _ = blobs(90, 16, 6, 1.0, seed=k1)
    _, _, vq = dense_encoding(dense_sq_euclidean(x), k1, k2)
    np.testing.assert_allclose(k_reciprocal_jaccard(x, k1, k2, dense=True), dense_jaccard(vq), atol=1e-5)


def test_fewer_points_than_k1():
    x, _ = blobs(12, 8, 3, 0.5, seed=3)
    _, _, vq = dense_encoding(dense_sq_euclidean(x), 20, 6)
    np.testing.assert_allclose(k_reciprocal_jaccard(x, 20, 6, dense=True), dense_jaccard(vq), atol=1e-5)


def test_hand_computed_case():
    x, expected = _hand_case()
    np.testing.assert_allclose(k_reciprocal_jaccard(x, 1, 1, dense=True), expected, atol=1e-7)


def test_float32_features_close_to_float64(data):
    x, ref = data
    out = k_reciprocal_jaccard(torch.from_numpy(x).float(), 20, 6, dense=True)
    assert np.abs(out - ref).max() < 1e-3


@pytest.mark.gpu
def test_jaccard_on_cuda_features_runs_on_the_gpu_and_matches(data, monkeypatch):
    """CUDA features: the k-NN strips and pair distances run in torch on the GPU (FAISS's CPU
    routines never see them), and the Jaccard distances match the float64 reference."""
    from fastmmt.cluster import knn as knn_mod

    x, ref = data
    seen = []
    real_strip = knn_mod._strip

    def strip(xx, norms, s, e):
        out = real_strip(xx, norms, s, e)
        seen.append(out.device.type)
        return out

    monkeypatch.setattr(knn_mod, "_strip", strip)
    out = k_reciprocal_jaccard(torch.from_numpy(x).float().cuda(), 20, 6, dense=True)
    assert seen and set(seen) == {"cuda"}
    assert np.abs(out - ref).max() < 1e-3  # the float32 CPU test's bound


@pytest.mark.parametrize("k,block", [(21, 64), (40, 16), (180, 64), (1, 1000)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_exact_matches_sort(data, k, block, dtype):
    """Blocks narrower than k, k = N and a single block: the symmetric strips and their merge;
    float32 goes through FAISS's pairwise_L2sqr, float64 through torch."""
    x, _ = data
    nb = knn_exact(torch.from_numpy(x).to(dtype), k, block=block)
    d = dense_sq_euclidean(torch.from_numpy(x).to(dtype).numpy())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    if dtype == torch.float64:
        np.testing.assert_array_equal(nb.ids, np.argsort(d, axis=1, kind="stable")[:, :k])
    # float32: near-ties (within rounding) may swap; the true distances of the ids returned
    # must still be the k smallest
    np.testing.assert_allclose(np.take_along_axis(d, nb.ids, axis=1), np.sort(d, axis=1)[:, :k], rtol=0, atol=tol)
    np.testing.assert_allclose(nb.dist, np.sort(d, axis=1)[:, :k], rtol=0, atol=tol)
    np.testing.assert_allclose(nb.row_max, d.max(axis=1), rtol=tol)


def test_knn_hnsw_recall_and_row_max(data):
    x, _ = data
    exact = knn_exact(torch.from_numpy(x).float(), 21)
    approx = knn_hnsw(torch.from_numpy(x).float(), 21)
    assert np.all(approx.ids[:, 0] == np.arange(len(x)))
    recall = np.mean([len(np.intersect1d(a, b)) / 21 for a, b in zip(approx.ids, exact.ids)])
    assert recall > 0.98
    # a max over (a subset of) the same distances: never above the exact maximum
    assert np.all(approx.row_max <= exact.row_max + 1e-5)
    assert np.all(approx.row_max >= approx.dist[:, -1] - 1e-6)
    out = k_reciprocal_jaccard(x, 20, 6, index="hnsw", dense=True)
    assert out.shape == (len(x), len(x)) and np.all(np.diag(out) == 0)


def test_bad_input():
    x = np.random.default_rng(0).standard_normal((30, 4))
    with pytest.raises(ClusterError, match="k2"):
        k_reciprocal_jaccard(x, 5, 7)
    bad = x.copy()
    bad[[3, 9]] = np.nan
    with pytest.raises(ClusterError, match="2 of 30 rows"):
        k_reciprocal_jaccard(bad)
    with pytest.raises(ClusterError, match="empty"):
        k_reciprocal_jaccard(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="unknown k-NN index"):
        k_reciprocal_jaccard(x, index="ivf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_sq_distances_match_dense(data, dtype):
    """float32 goes through FAISS's indexed inner products, float64 through torch."""
    x, _ = data
    t = torch.from_numpy(x).to(dtype)
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, len(x), 500), rng.integers(0, len(x), 500)
    rows[:7] = cols[:7]  # a point with itself: exactly 0
    got = pair_sq_distances(t, sq_norms(t), rows, cols)
    ref = dense_sq_euclidean(t.numpy())[rows, cols]
    assert got.dtype == np.float64 and np.all(got[:7] == 0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_knn_exact_bad_k(data):
    x = torch.from_numpy(data[0])
    for k in (0, len(x) + 1):
        with pytest.raises(ValueError, match="k must be in"):
            knn_exact(x, k)


@pytest.mark.parametrize("num_rows,block_rows", [(180, 7), (180, 1), (50, 3)])
def test_jaccard_rows_blocks_and_first_rows(data, num_rows, block_rows):
    """Row blocks, pairs mirrored across blocks, and a prefix of the rows (as re-ranking uses)."""
    x, ref = data
    t = torch.from_numpy(x)
    nb = knn_exact(t, 21)
    v = query_expand(encode(nb.ids, feature_pair_distance(t, nb), 20), nb.ids, 6)
    jac = jaccard_rows(v, num_rows, block_elems=block_rows * len(x))
    np.testing.assert_allclose(jac.to_dense(), ref[:num_rows], atol=1e-5)
    assert jac.nnz == int((ref[:num_rows] < 1).sum())
    for r in range(num_rows):
        assert np.all(np.diff(jac.row(r)[0]) > 0)


def test_knn_exact_float32_strided_features(data):
    """A strided float32 view (FAISS's routines read raw pointers) gives the k-NN of its values."""
    x, _ = data
    wide = np.repeat(x, 2, axis=1)  # columns 0, 2, 4, ... are x again
    view = torch.from_numpy(wide).float()[:, ::2]
    assert not view.is_contiguous()
    nb = knn_exact(view, 21, block=64)
    ref = knn_exact(torch.from_numpy(x).float().contiguous(), 21, block=64)
    np.testing.assert_array_equal(nb.ids, ref.ids)
    np.testing.assert_array_equal(nb.dist, ref.dist)
