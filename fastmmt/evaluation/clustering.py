"""How well pseudo-labels recover the true identities (a diagnostic; training never sees it).

Real re-ID training sets carry their true ids in the file names, so the trainer can log, per
epoch, how close the clustering is to them: NMI, and pairwise precision / recall (of all pairs
put in one cluster, the share with one id; of all same-id pairs, the share put in one cluster),
with recall split into same-camera and cross-camera pairs. Cross-camera recall is what MMT has
to grow: a clustering that only groups tracklets (same camera) teaches camera features.
"""
from __future__ import annotations

import numpy as np


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _pairs(counts: np.ndarray) -> float:
    """Number of unordered pairs within groups of the given sizes."""
    c = counts.astype(np.float64)
    return float((c * (c - 1) / 2).sum())


def _group_sizes(*keys: np.ndarray) -> np.ndarray:
    """Sizes of the groups of rows sharing every key."""
    _, counts = np.unique(np.stack(keys, axis=1), axis=0, return_counts=True)
    return counts


def pseudo_label_quality(pred: np.ndarray, true: np.ndarray, cams: np.ndarray | None = None) -> dict[str, float]:
    """NMI (arithmetic normalisation, as scikit-learn's default) and pairwise precision/recall of
    ``pred`` against ``true`` over the points with ``pred >= 0`` (DBSCAN outliers are left out;
    ``coverage`` is their complement). With ``cams``, recall is also given per camera relation."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred and true must be 1-D of one length, got {pred.shape} and {true.shape}")
    keep = pred >= 0
    out = {"coverage": float(keep.mean()) if len(pred) else 0.0}
    p, t = pred[keep], true[keep]
    if len(p) == 0:
        return out | {"nmi": 0.0, "pair_precision": 0.0, "pair_recall": 0.0}
    joint = _group_sizes(p, t)
    hp, ht = _entropy(np.unique(p, return_counts=True)[1]), _entropy(np.unique(t, return_counts=True)[1])
    mi = hp + ht - _entropy(joint)
    out["nmi"] = float(mi / ((hp + ht) / 2)) if hp + ht > 0 else 1.0
    both = _pairs(joint)
    in_cluster, same_id = _pairs(np.unique(p, return_counts=True)[1]), _pairs(np.unique(t, return_counts=True)[1])
    out["pair_precision"] = both / in_cluster if in_cluster else 1.0
    out["pair_recall"] = both / same_id if same_id else 1.0
    if cams is not None:
        c = np.asarray(cams)[keep]
        both_same_cam, id_same_cam = _pairs(_group_sizes(p, t, c)), _pairs(_group_sizes(t, c))
        cross_both, cross_id = both - both_same_cam, same_id - id_same_cam
        out["pair_recall_same_cam"] = both_same_cam / id_same_cam if id_same_cam else 1.0
        out["pair_recall_cross_cam"] = cross_both / cross_id if cross_id else 1.0
    return out
