"""Training augmentation statistics, read back from the DALI loader's output images.

The source is a lossless 32x16 PNG whose red channel encodes the row and green the column, with
constant blue: every output pixel says which source pixel it shows, or whether it is zero
padding or erased. From each output view we recover the flip, the crop offset and the erased
box, then test their distributions against the spec and against a plain reference of the
erasing rule written here (two-sample KS tests, fixed seeds).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from fastmmt.data import ImageRecord
from fastmmt.data.dali import DaliTrainLoader
from fastmmt.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, batch_views

pytestmark = pytest.mark.dali  # skipped, with the reason, where DALI is not installed

H, W, PAD = 32, 16, 10
BLUE = 200
MEAN = np.array(IMAGENET_MEAN).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD).reshape(3, 1, 1)
ERASE_B = IMAGENET_MEAN[2]  # the fill written into the normalised tensor (blue channel)
PAD_B = -IMAGENET_MEAN[2] / IMAGENET_STD[2]
P_VALUE = 1e-4  # fixed seeds: a failure is a real distribution mismatch, not bad luck


def pattern() -> np.ndarray:
    rows, cols = np.mgrid[0:H, 0:W]
    return np.stack([rows * 8, cols * 16, np.full((H, W), BLUE)], -1).astype(np.uint8)


def recover(view: np.ndarray) -> dict:
    """Flip, crop offset (top, left) in the padded image and erased box of one output view.

    Flip and offsets are None when the erasure hides every image pixel (a corner crop plus a
    large box), or the flip alone when a single image column is left (then both fit).
    """
    blue = view[2]
    erased = np.abs(blue - ERASE_B) < 1e-4
    padded = np.abs(blue - PAD_B) < 1e-3
    shown = ~erased & ~padded
    box = None
    if erased.any():
        er, ec = np.nonzero(erased)
        box = (er.min(), ec.min(), er.max() - er.min() + 1, ec.max() - ec.min() + 1)
        assert erased.sum() == box[2] * box[3], "the erased region must be one rectangle"
    out = {"flip": None, "top": None, "left": None, "box": box}
    if not shown.any():
        return out
    pix = np.rint((view * STD + MEAN) * 255)
    i, j = np.nonzero(shown)
    src_r, src_c = pix[0][shown] / 8, pix[1][shown] / 16
    dy = np.unique(src_r - i)
    assert dy.size == 1, "rows must be shifted by one constant"
    straight, mirrored = np.unique(src_c - j), np.unique(src_c + j)
    assert straight.size == 1 or mirrored.size == 1, "columns must be shifted or mirrored"
    out["top"] = top = int(dy[0] + PAD)
    if straight.size == 1 and mirrored.size == 1:
        return out
    out["flip"] = flip = bool(mirrored.size == 1)
    out["left"] = left = int(W - 1 + PAD - mirrored[0]) if flip else int(straight[0] + PAD)
    # the zero padding is exactly where the crop window leaves the image (outside the erasure)
    rr, cc = np.mgrid[0:H, 0:W]
    c_src = cc + left - PAD
    outside = (rr + top - PAD < 0) | (rr + top - PAD >= H) | (c_src < 0) | (c_src >= W)
    np.testing.assert_array_equal(padded, outside & ~erased)
    return out


def known(recovered, key: str) -> np.ndarray:
    """The recovered values of ``key`` over all views, where recoverable (>= 99 % of them)."""
    vals = [v[key] for s in recovered for v in s]
    got = np.array([x for x in vals if x is not None])
    assert got.size >= 0.99 * len(vals)
    return got


@pytest.fixture(scope="module")
def recovered(tmp_path_factory) -> list[list[dict]]:
    """Recovered draws of 1920 images x 2 views from the DALI training loader."""
    path = str(tmp_path_factory.mktemp("pattern") / "pattern.png")
    Image.fromarray(pattern()).save(path)
    records = [ImageRecord(path, pid, k % 2) for pid in range(16) for k in range(4)]
    labels = np.array([r.pid for r in records])
    loader = DaliTrainLoader(records, labels, H, W, batch_size=64, num_views=2, seed=3)
    out = []
    for epoch in range(3):
        for batch in loader.epoch(epoch, 10):
            assert len(batch.views) == 2
            v1, v2 = (v.numpy().astype(np.float64) for v in batch.views)
            out += [[recover(a), recover(b)] for a, b in zip(v1, v2)]
    return out


def reference_boxes(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """(erased, top, left, bh, bw) by the spec's erasing rule (p 0.5, area 2-40 %, aspect
    0.3-1/0.3, up to 100 tries, first fitting box placed uniformly), written plainly with NumPy."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row = (0, 0, 0, 0, 0)
        if rng.random() < 0.5:
            for _ in range(100):
                area = rng.uniform(0.02, 0.4) * h * w
                r = rng.uniform(0.3, 1 / 0.3)
                bh, bw = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
                if bh < h and bw < w:
                    row = (1, int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw)
                    break
        rows.append(row)
    return np.array(rows, dtype=np.int64)


def binomial_ok(successes: int, n: int, p: float) -> bool:
    return stats.binomtest(successes, n, p).pvalue > P_VALUE


def test_flip_rate(recovered):
    flips = known(recovered, "flip")
    assert binomial_ok(int(flips.sum()), len(flips), 0.5)


def test_crop_offsets_uniform_over_pad_range(recovered):
    for key in ("top", "left"):
        vals = known(recovered, key)
        assert vals.min() >= 0 and vals.max() <= 2 * PAD
        counts = np.bincount(vals, minlength=2 * PAD + 1)
        assert stats.chisquare(counts).pvalue > P_VALUE, counts


def test_erase_probability_and_box_distribution(recovered):
    boxes = [v["box"] for s in recovered for v in s]
    done = np.array([b for b in boxes if b is not None])
    assert binomial_ok(len(done), len(boxes), 0.5)
    top, left, bh, bw = done.T
    assert (bh >= 1).all() and (bw >= 1).all() and (bh < H).all() and (bw < W).all()
    assert (top + bh <= H).all() and (left + bw <= W).all()
    ref = reference_boxes(4000, H, W, seed=11)
    ref = ref[ref[:, 0] == 1]
    for ours, theirs in [(bh * bw, ref[:, 3] * ref[:, 4]), (bh / bw, ref[:, 3] / ref[:, 4]),
                         (top / (H - bh + 1), ref[:, 1] / (H - ref[:, 3] + 1)),
                         (left / (W - bw + 1), ref[:, 2] / (W - ref[:, 4] + 1))]:
        assert stats.ks_2samp(ours, theirs).pvalue > P_VALUE


def test_views_are_independent(recovered):
    n = len(recovered)
    both = [s for s in recovered if None not in (s[0]["left"], s[1]["left"])]
    assert len(both) >= 0.98 * n
    f1, f2 = (np.array([s[v]["flip"] for s in both]) for v in (0, 1))
    table = np.array([[np.sum((f1 == a) & (f2 == b)) for b in (0, 1)] for a in (0, 1)])
    assert stats.chi2_contingency(table).pvalue > P_VALUE
    for key in ("top", "left"):
        a, b = (np.array([s[v][key] for s in both]) for v in (0, 1))
        assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(len(both))
    e1, e2 = (np.array([s[v]["box"] is not None for s in recovered]) for v in (0, 1))
    table = np.array([[np.sum((e1 == a) & (e2 == b)) for b in (0, 1)] for a in (0, 1)])
    assert stats.chi2_contingency(table).pvalue > P_VALUE
    same = sum(s[0] == s[1] for s in recovered)
    assert same <= 0.01 * n  # identical draws for both views would be ~(1/2)(1/21)^2 at most


@pytest.mark.parametrize("h,w", [(256, 128), (32, 16)])
def test_sampled_erasing_matches_reference_algorithm(h, w):
    """Many draws of the shared view sampler vs the plain reference: rate, area, aspect,
    placement, and the spec's ranges (area 2-40 % of the image, aspect 0.3-3.33, up to rounding)."""
    n = 6000
    (p,) = batch_views(AugmentSpec(h, w), range(5000, 5000 + n), 1)
    done = p.erase_shape[:, 0] > 0
    assert binomial_ok(int(done.sum()), n, 0.5)
    bh, bw = p.erase_shape[done].T
    top, left = p.erase_anchor[done].T
    assert (p.erase_shape[~done] == 0).all() and (p.erase_anchor[~done] == 0).all()
    ref = reference_boxes(n, h, w, seed=6)
    ref = ref[ref[:, 0] == 1]
    for ours, theirs in [(bh * bw, ref[:, 3] * ref[:, 4]), (bh / bw, ref[:, 3] / ref[:, 4]),
                         (top / (h - bh + 1), ref[:, 1] / (h - ref[:, 3] + 1)),
                         (left / (w - bw + 1), ref[:, 2] / (w - ref[:, 4] + 1))]:
        assert stats.ks_2samp(ours, theirs).pvalue > P_VALUE
    if h == 256:  # rounding h and w to integers moves area and aspect by < 8 % here
        area, aspect = bh * bw / (h * w), bh / bw
        assert area.min() >= 0.02 * 0.92 and area.max() <= 0.4 * 1.08
        assert aspect.min() >= 0.3 * 0.92 and aspect.max() <= (1 / 0.3) * 1.08
        assert area.max() > 0.35 and area.min() < 0.03  # the whole range is used
    assert (top + bh <= h).all() and (left + bw <= w).all() and (top >= 0).all() and (left >= 0).all()
    assert binomial_ok(int(p.flip.sum()), n, 0.5)
    assert p.crop.min() == 0 and p.crop.max() == 2 * PAD


def test_no_erasing_and_no_flip_when_disabled():
    (p,) = batch_views(AugmentSpec(H, W, flip_p=0.0, erase_p=0.0), range(500), 1)
    assert not p.flip.any() and not p.erase_shape.any()
    (q,) = batch_views(AugmentSpec(H, W).off(), range(500), 1)
    assert not q.flip.any() and not q.erase_shape.any() and not q.crop.any()
    with pytest.raises(ValueError, match="erase_p"):
        AugmentSpec(H, W, erase_p=1.5)
