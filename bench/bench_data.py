"""Data layer speed: the training augmentation and the synthetic generator.

- ``TrainTransform`` (flip/pad/crop on the uint8 tensor, then normalise + erase) against a plain
  PIL + NumPy pipeline doing the same steps (PIL flip, PIL pad by pasting, PIL crop, NumPy
  normalise + erase), per image at the spec's 256x128 from a 128x64 JPEG (extra_info
  ``speedup_vs_pil``, measured in the same run).
- ``generate_synthetic`` (about 300 images, vectorised over batches of 128) against the same
  generator drawing one image at a time (``batch=1``: the unvectorised baseline;
  ``speedup_vs_per_image``).

Run: .venv/bin/python -m pytest bench/bench_data.py -q --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastmmt.data import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, load_image
from fastmmt.data import synthetic

H, W = 256, 128


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "img.jpg"
    arr = np.random.default_rng(0).integers(0, 256, (128, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return str(path)


def _pil_reference(path: str, rng: np.random.Generator) -> np.ndarray:
    img = load_image(path).resize((W, H), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    canvas = Image.new("RGB", (W + 20, H + 20))
    canvas.paste(img, (10, 10))
    t, l = rng.integers(0, 21, 2)
    x = (np.asarray(canvas.crop((l, t, l + W, t + H)), np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    x = x.transpose(2, 0, 1).copy()
    if rng.random() < 0.5:
        area, r = rng.uniform(0.02, 0.4) * H * W, rng.uniform(0.3, 1 / 0.3)
        h, w = int(round((area * r) ** 0.5)), int(round((area / r) ** 0.5))
        if h < H and w < W:
            y0, x0 = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
            x[:, y0:y0 + h, x0:x0 + w] = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    return x


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def test_train_transform(benchmark, jpeg):
    t = TrainTransform(H, W)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    ref = _time(lambda: _pil_reference(jpeg, rng), 200)
    benchmark(lambda: t(load_image(jpeg), g))
    benchmark.extra_info["pil_numpy_reference_s"] = ref
    benchmark.extra_info["speedup_vs_pil"] = ref / benchmark.stats.stats.median


def test_generate_synthetic(benchmark, tmp_path_factory):
    def run(batch: int) -> None:
        synthetic.generate_synthetic(str(tmp_path_factory.mktemp("gen")), seed=0, domain="target",
                                     num_ids=32, num_test_ids=1, images_per_id=8, batch=batch)

    per_image = _time(lambda: run(1), 1)
    benchmark.pedantic(lambda: run(128), rounds=3, iterations=1)
    benchmark.extra_info["batch1_s"] = per_image
    benchmark.extra_info["speedup_vs_per_image"] = per_image / benchmark.stats.stats.median
