"""pseudo_label_quality against scikit-learn's NMI and pair counts by brute force."""
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from fastmmt.evaluation import pseudo_label_quality


def _brute_pairs(pred, true, cams):
    n = len(pred)
    i, j = np.triu_indices(n, 1)
    inc, same, samec = pred[i] == pred[j], true[i] == true[j], cams[i] == cams[j]
    return (inc & same).sum() / inc.sum(), (inc & same).sum() / same.sum(), \
        (inc & same & samec).sum() / (same & samec).sum(), (inc & same & ~samec).sum() / (same & ~samec).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 12, 200)
    cams = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, true, rng.integers(0, 15, 200))  # 30% relabelled
    q = pseudo_label_quality(pred, true, cams)
    assert q["nmi"] == pytest.approx(normalized_mutual_info_score(true, pred), abs=1e-12)
    prec, rec, rec_s, rec_c = _brute_pairs(pred, true, cams)
    assert q["pair_precision"] == pytest.approx(prec)
    assert q["pair_recall"] == pytest.approx(rec)
    assert q["pair_recall_same_cam"] == pytest.approx(rec_s)
    assert q["pair_recall_cross_cam"] == pytest.approx(rec_c)
    assert q["coverage"] == 1.0


def test_outliers_left_out_and_perfect_labels():
    true = np.array([0, 0, 1, 1, 2, 2])
    q = pseudo_label_quality(np.array([5, 5, 7, 7, -1, -1]), true)
    assert q["coverage"] == pytest.approx(4 / 6)
    assert q["nmi"] == pytest.approx(1.0) and q["pair_precision"] == 1.0 and q["pair_recall"] == 1.0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="one length"):
        pseudo_label_quality(np.zeros(3), np.zeros(4))
