"""fastmmt.evaluation.visualize: rank-list pictures (size, tile positions, frame colours)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastmmt.data import ImageReadError, ImageRecord, load_dataset
from fastmmt.data.synthetic import generate_synthetic
from fastmmt.evaluation.visualize import GREEN, RED, RankLayout, rank_lists, visualize_ranked_results

H, W, FRAME, QGAP, SPACING, ROWGAP, LABEL = 40, 20, 3, 10, 4, 6, 12
LAYOUT = RankLayout(size=(H, W), frame=FRAME, query_gap=QGAP, spacing=SPACING, row_gap=ROWGAP, label_height=LABEL)


def _solid(path, colour):
    Image.new("RGB", (16, 32), colour).save(path)
    return str(path)


def _colour(i: int) -> tuple[int, int, int]:
    return (10 + 20 * i, 250 - 20 * i, 100 + 7 * i)  # distinct per index, none pure green/red


def _toy(tmp_path):
    """1 query (pid 1, cam 0); gallery: 0 same pid+cam (excluded), 1 same pid other cam,
    2-5 other pids, 6 same pid other cam, 7 same pid+cam (excluded)."""
    q = [ImageRecord(_solid(tmp_path / "q.png", (255, 255, 0)), 1, 0)]
    pids = [1, 1, 2, 3, 4, 5, 1, 1]
    cams = [0, 1, 0, 0, 1, 2, 2, 0]
    g = [ImageRecord(_solid(tmp_path / f"g{i}.png", _colour(i)), p, c) for i, (p, c) in enumerate(zip(pids, cams))]
    return q, g


def _pixel(img: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in img[y, x])


def test_rank_lists_exclude_same_id_same_camera_and_keep_ties_in_order():
    dist = np.array([[0.0, 0.3, 0.2, 0.2, 0.9, 0.5, 0.1, 0.05]])
    (r,) = rank_lists(dist, [1], [1, 1, 2, 3, 4, 5, 1, 1], [0], [0, 1, 0, 0, 1, 2, 2, 0], topk=5)
    # by distance: 0 (excluded), 7 (excluded), 6, 2 / 3 tied (gallery order), 1, 5, 4
    assert r.gallery.tolist() == [6, 2, 3, 1, 5]
    assert r.correct.tolist() == [True, False, False, True, False]


def test_picture_size_positions_and_frame_colours(tmp_path):
    q, g = _toy(tmp_path)
    dist = np.array([[0.0, 0.3, 0.2, 0.25, 0.9, 0.5, 0.1, 0.05]])
    rerank = np.array([[0.0, 0.1, 0.6, 0.7, 0.8, 0.9, 0.2, 0.0]])
    topk = 4
    (path,) = visualize_ranked_results(dist, q, g, tmp_path / "out", topk=topk, reranked_distmat=rerank,
                                       layout=LAYOUT)
    assert path.name == "00000_q.png"
    img = np.asarray(Image.open(path).convert("RGB"))
    width = W + QGAP + topk * W + (topk - 1) * SPACING
    height = 2 * (LABEL + H) + ROWGAP
    assert img.shape == (height, width, 3)
    expected = {0: ([6, 2, 3, 1], [True, False, False, True]),   # plain distances
                1: ([1, 6, 2, 3], [True, True, False, False])}   # re-ranked
    for row, (order, correct) in expected.items():
        y0 = row * (LABEL + H + ROWGAP) + LABEL
        # the query tile: black frame around the query's yellow
        assert _pixel(img, 0, y0) == (0, 0, 0) and _pixel(img, W - 1, y0 + H - 1) == (0, 0, 0)
        assert _pixel(img, W // 2, y0 + H // 2) == (255, 255, 0)
        for j, (gi, ok) in enumerate(zip(order, correct)):
            x0 = W + QGAP + j * (W + SPACING)
            frame = GREEN if ok else RED
            for fx, fy in ((x0, y0), (x0 + W - 1, y0 + H - 1), (x0 + FRAME - 1, y0 + H // 2),
                           (x0 + W // 2, y0 + FRAME - 1)):
                assert _pixel(img, fx, fy) == frame, (row, j, fx, fy)
            assert _pixel(img, x0 + W // 2, y0 + H // 2) == _colour(gi), (row, j)
            assert _pixel(img, x0 + FRAME, y0 + FRAME) == _colour(gi)
            if j:  # the spacing between tiles stays white
                assert _pixel(img, x0 - 1, y0 + H // 2) == (255, 255, 255)
        assert _pixel(img, W + QGAP // 2, y0 + H // 2) == (255, 255, 255)  # the gap after the query


def test_synthetic_domain_frames_match_identities(tmp_path):
    root = generate_synthetic(str(tmp_path / "syn"), seed=0, domain="target", num_ids=2, num_test_ids=6,
                              images_per_id=6, height=32, width=16)
    ds = load_dataset("synthetic", root)
    qp = np.array([r.pid for r in ds.query])
    gp = np.array([r.pid for r in ds.gallery])
    qc = np.array([r.camid for r in ds.query])
    gc = np.array([r.camid for r in ds.gallery])
    rng = np.random.default_rng(0)
    # noisy "features": same identity closer on average, so lists mix right and wrong matches
    centres = {p: rng.normal(size=8) for p in np.unique(np.concatenate([qp, gp]))}
    qf = np.stack([centres[p] + rng.normal(scale=0.8, size=8) for p in qp])
    gf = np.stack([centres[p] + rng.normal(scale=0.8, size=8) for p in gp])
    dist = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    topk = 5
    paths = visualize_ranked_results(dist, ds.query, ds.gallery, tmp_path / "vis", topk=topk, queries=[0, 2],
                                     layout=LAYOUT)
    assert [p.name.split("_")[0] for p in paths] == ["00000", "00002"]
    colours = set()
    for q, path in zip([0, 2], paths):
        # the expected list, computed here by plain numpy
        order = [g for g in np.argsort(dist[q], kind="stable") if not (gp[g] == qp[q] and gc[g] == qc[q])][:topk]
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape == (LABEL + H, W + QGAP + topk * W + (topk - 1) * SPACING, 3)
        for j, g in enumerate(order):
            colour = _pixel(img, W + QGAP + j * (W + SPACING), LABEL)
            assert colour == (GREEN if gp[g] == qp[q] else RED)
            colours.add(colour)
    assert colours == {GREEN, RED}  # both kinds of frame were checked


def test_bad_input_is_named(tmp_path):
    q, g = _toy(tmp_path)
    dist = np.zeros((1, len(g)))
    with pytest.raises(ValueError, match="reranked_distmat has shape"):
        visualize_ranked_results(dist, q, g, tmp_path, reranked_distmat=np.zeros((1, 3)), layout=LAYOUT)
    with pytest.raises(ValueError, match="query index 4"):
        visualize_ranked_results(dist, q, g, tmp_path, queries=[4], layout=LAYOUT)
    with pytest.raises(ValueError, match="g_pids must be 8 integers"):
        rank_lists(dist, [1], [1.5] * 8, [0], [0] * 8)
    broken = [ImageRecord(str(tmp_path / "gone.png"), 9, 9)] + g[1:]
    with pytest.raises(ImageReadError, match="gone.png"):
        visualize_ranked_results(np.arange(8.0)[None], q, broken, tmp_path / "x", topk=3, layout=LAYOUT)
