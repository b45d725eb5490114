"""Synthetic domains: determinism, Market layout, disjoint identities, cameras, domain shift."""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
from PIL import Image

from fastmmt.data import DomainStyle, generate_domains, generate_synthetic, load_dataset
from fastmmt.data.synthetic import STYLES, _camera_log_gains, _cameras

SIZE = dict(num_ids=8, num_test_ids=6, images_per_id=6)
NAME = re.compile(r"^(-1|\d{4})_c(\d)s1_(\d{6})_01\.jpg$")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    return {d: generate_synthetic(os.path.join(out, d), seed=5, domain=d, **SIZE) for d in ("source", "target")}


def _files(base: str) -> dict[str, bytes]:
    out = {}
    for folder in sorted(os.listdir(base)):
        sub = os.path.join(base, folder)
        if os.path.isdir(sub):
            for name in sorted(os.listdir(sub)):
                with open(os.path.join(sub, name), "rb") as f:
                    out[f"{folder}/{name}"] = f.read()
    return out


def _raw_pids(base: str, folder: str) -> set[int]:
    return {int(NAME.match(n).group(1)) for n in os.listdir(os.path.join(base, folder))}


def test_same_seed_same_bytes(domains, tmp_path):
    again = generate_synthetic(str(tmp_path / "again"), seed=5, domain="source", **SIZE)
    assert _files(again) == _files(domains["source"])
    other = generate_synthetic(str(tmp_path / "other"), seed=6, domain="source", **SIZE)
    a, b = _files(other), _files(domains["source"])
    assert a.keys() != b.keys() or any(a[k] != b[k] for k in a)


@pytest.mark.parametrize("domain,cams", [("source", 6), ("target", 5)])
def test_market_layout_parses(domains, domain, cams):
    base = domains[domain]
    assert os.path.basename(base) == "Market-1501-v15.09.15"
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        names = os.listdir(os.path.join(base, folder))
        assert names and all(NAME.match(n) for n in names), folder
        assert all(Image.open(os.path.join(base, folder, n)).size == (64, 128) for n in names[:5])
    ds = load_dataset("market1501", os.path.dirname(base))
    same = load_dataset("synthetic", base)
    assert [r.path for r in ds.train] == [r.path for r in same.train]
    assert ds.num_train_pids == SIZE["num_ids"] and sorted({r.pid for r in ds.train}) == list(range(SIZE["num_ids"]))
    for recs in (ds.train, ds.query, ds.gallery):
        assert {r.camid for r in recs} <= set(range(cams))
    assert ds.num_train_cams > 1
    # test identities: disjoint from train, every query has a same-id gallery image on another camera
    train_raw = _raw_pids(base, "bounding_box_train")
    test_raw = {r.pid for r in ds.query}
    assert len(test_raw) == SIZE["num_test_ids"] and not train_raw & test_raw
    for q in ds.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in ds.gallery)
    # Market extras: distractors (pid 0) kept in the gallery, junk (-1) written but dropped
    assert any(g.pid == 0 for g in ds.gallery)
    assert -1 in _raw_pids(base, "bounding_box_test")
    assert len(ds.gallery) == len(os.listdir(os.path.join(base, "bounding_box_test"))) - sum(
        n.startswith("-1_") for n in os.listdir(os.path.join(base, "bounding_box_test")))


def test_domains_have_disjoint_identities(domains):
    pids = {}
    for d, base in domains.items():
        pids[d] = set().union(*(_raw_pids(base, f) for f in ("bounding_box_train", "query", "bounding_box_test")))
        pids[d] -= {0, -1}
    assert not pids["source"] & pids["target"]
    assert max(pids["source"]) < 5000 < min(pids["target"])


def _pixels(base: str) -> np.ndarray:
    folder = os.path.join(base, "bounding_box_train")
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)), np.float64) / 255
                     for n in sorted(os.listdir(folder))])


def test_measurable_domain_shift(domains, tmp_path):
    src, tgt = _pixels(domains["source"]), _pixels(domains["target"])
    # colour response: the same target people and scenes (same seed, same random stream) with and
    # without the target's response; its cast (blue gain 0.82), hue rotation (90 degrees) and gamma
    # 1.3 move the mean colour and every pixel by far more than JPEG noise (~0.01)
    neutral = dataclasses.replace(STYLES["target"], hue_shift=0.0, saturation=1.0, gamma=1.0, cast=(1.0, 1.0, 1.0))
    flat = _pixels(generate_synthetic(str(tmp_path / "n"), seed=5, domain="target", style=neutral, **SIZE))
    assert np.linalg.norm(flat.mean((0, 1, 2)) - tgt.mean((0, 1, 2))) > 0.15
    assert np.abs(flat - tgt).mean() > 0.1
    # resolution: the target is rendered at half size and upsampled -> much weaker horizontal
    # gradients than the sharp source
    grad = lambda a: np.abs(np.diff(a, axis=2)).mean()  # noqa: E731
    assert grad(src) > 1.3 * grad(tgt)


def test_shared_scene_gives_every_camera_one_backdrop():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    own = _cameras(rng(), DomainStyle(num_cams=4), 32, 16)
    shared = _cameras(rng(), DomainStyle(num_cams=4, shared_scene=True), 32, 16)
    assert all(np.array_equal(shared.scenes[0], sc) for sc in shared.scenes[1:])
    assert np.array_equal(own.scenes[0], shared.scenes[0])   # camera 0 drawn the same way
    assert not any(np.array_equal(own.scenes[0], sc) for sc in own.scenes[1:])
    assert np.array_equal(own.gains, shared.gains)           # cameras keep their own responses


def test_style_knobs_and_errors(tmp_path):
    plain = DomainStyle(num_cams=3, noise=0.0, clutter=0, occlusion_p=0.0)
    gray = DomainStyle(num_cams=3, noise=0.0, clutter=0, occlusion_p=0.0, saturation=0.0)
    a = _pixels(generate_synthetic(str(tmp_path / "a"), domain="source", style=plain, **SIZE))
    b = _pixels(generate_synthetic(str(tmp_path / "b"), domain="source", style=gray, **SIZE))
    chroma = lambda x: (x.max(-1) - x.min(-1)).mean()  # noqa: E731
    assert chroma(a) > 0.05 and chroma(b) < 0.02     # saturation 0 leaves only JPEG chroma noise
    ds = load_dataset("synthetic", str(tmp_path / "a"))
    assert {r.camid for r in ds.train + ds.query + ds.gallery} <= {0, 1, 2}
    with pytest.raises(ValueError, match="domain must be one of"):
        generate_synthetic(str(tmp_path / "c"), domain="middle", **SIZE)
    with pytest.raises(ValueError, match="num_cams must be in 2..9"):
        generate_synthetic(str(tmp_path / "c"), style=DomainStyle(num_cams=12), **SIZE)
    with pytest.raises(ValueError, match="size must be one of"):
        generate_domains(str(tmp_path / "d"), size="huge")


def test_generate_domains_tiny(tmp_path):
    src, tgt = generate_domains(str(tmp_path), seed=1, size="tiny")
    assert src == os.path.join(str(tmp_path), "source", "Market-1501-v15.09.15")
    assert tgt == os.path.join(str(tmp_path), "target", "Market-1501-v15.09.15")
    assert load_dataset("market1501", src).num_train_pids == 12
    assert load_dataset("market1501", tgt).num_train_pids == 12


@pytest.mark.parametrize("cams", [2, 5, 9])
def test_camera_gains_differ_by_the_same_amount_for_every_seed(cams):
    ladders = []
    for seed in range(4):
        g = _camera_log_gains(np.random.default_rng(seed), cams, cast=0.05, brightness=0.08)
        light = g.mean(1)                 # the tint is orthogonal to grey: the row mean is brightness
        tint = g - light[:, None]
        np.testing.assert_allclose(np.linalg.norm(tint, axis=1), 0.05 * np.sqrt(2))  # one strength
        np.testing.assert_allclose(tint.sum(0), 0, atol=1e-12)                        # evenly spaced
        np.testing.assert_allclose([light.mean(), light.std()], [0, 0.08], atol=1e-12)
        ladders.append(np.sort(light))
    np.testing.assert_allclose(ladders[0], ladders[-1], atol=1e-12)  # the same brightness ladder, reordered
