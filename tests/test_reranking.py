"""k-reciprocal re-ranking vs a straightforward dense implementation of the published algorithm."""
import numpy as np
import pytest
import torch

from fastmmt.evaluation.reranking import iter_re_ranking_blocks, re_ranking, re_ranking_features
from test_cluster_jaccard import blobs
from test_cluster_reference import dense_re_ranking, dense_sq_euclidean


@pytest.fixture(scope="module")
def split():
    x, y = blobs(170, 24, 20, 0.8, seed=21)
    q, g = x[:40], x[40:]
    d = dense_sq_euclidean(x)
    return q, g, d[:40, 40:], d[:40, :40], d[40:, 40:]


def test_dense_signature_matches_reference(split):
    _, _, qg, qq, gg = split
    out = re_ranking(qg, qq, gg)
    assert out.shape == (40, 130) and out.dtype == np.float32
    np.testing.assert_allclose(out, dense_re_ranking(qg, qq, gg, 20, 6, 0.3), atol=1e-5)


@pytest.mark.parametrize("k1,k2,lam", [(5, 2, 0.0), (10, 1, 0.5), (20, 6, 1.0)])
def test_parameters(split, k1, k2, lam):
    _, _, qg, qq, gg = split
    np.testing.assert_allclose(re_ranking(qg, qq, gg, k1, k2, lam),
                               dense_re_ranking(qg, qq, gg, k1, k2, lam), atol=1e-5)


def test_lambda_one_is_normalised_distance(split):
    _, _, qg, qq, gg = split
    row_max = np.maximum(np.hstack([qq, qg]).max(1), 0)
    np.testing.assert_allclose(re_ranking(qg, qq, gg, lambda_value=1.0), qg / row_max[:, None], atol=1e-6)


def test_features_version_matches_dense(split):
    q, g, qg, qq, gg = split
    ref = dense_re_ranking(qg, qq, gg, 20, 6, 0.3)
    out = re_ranking_features(torch.from_numpy(q), torch.from_numpy(g))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    blocks = list(iter_re_ranking_blocks(q, g, block_size=16))
    assert [s for s, _ in blocks] == [0, 16, 32]
    np.testing.assert_allclose(np.vstack([b for _, b in blocks]), out, atol=1e-6)


def test_gallery_order_does_not_matter(split):
    """Permuting the gallery permutes the output columns and changes nothing else."""
    q, g, *_ = split
    perm = np.random.default_rng(3).permutation(len(g))
    np.testing.assert_allclose(re_ranking_features(q, g[perm]), re_ranking_features(q, g)[:, perm],
                               atol=1e-6)


def test_bad_input(split):
    q, g, qg, qq, gg = split
    with pytest.raises(ValueError, match=r"q_q_dist must have shape \(40, 40\)"):
        re_ranking(qg, gg, gg)
    bad = qg.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="q_g_dist has 1 NaN"):
        re_ranking(bad, qq, gg)
    with pytest.raises(ValueError, match="k2"):
        re_ranking(qg, qq, gg, k1=3, k2=5)
    with pytest.raises(ValueError, match="feature sizes differ"):
        re_ranking_features(q, g[:, :10])
