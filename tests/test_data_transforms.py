"""Transforms against an independent PIL + float64 numpy reference using the same random draws."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastmmt.data import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform

MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


def _image(h=40, w=24, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _norm(im: Image.Image) -> np.ndarray:
    return ((np.asarray(im, np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def _reference_train(img, h, w, g, flip_p=0.5, pad=10, erase_p=0.5, area=(0.02, 0.4), r1=0.3, tries=100):
    """The spec's PIL pipeline written plainly; draws in the documented order from g."""
    rand = lambda: float(torch.rand((), generator=g, dtype=torch.float64))  # noqa: E731
    randint = lambda hi: int(torch.randint(0, hi + 1, (), generator=g))  # noqa: E731
    im = img.resize((w, h), Image.BICUBIC)
    if rand() < flip_p:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    canvas = Image.new("RGB", (w + 2 * pad, h + 2 * pad), (0, 0, 0))
    canvas.paste(im, (pad, pad))
    top, left = randint(2 * pad), randint(2 * pad)
    x = _norm(canvas.crop((left, top, left + w, top + h)))
    if rand() < erase_p:
        for _ in range(tries):
            target = (area[0] + (area[1] - area[0]) * rand()) * h * w
            aspect = r1 + (1 / r1 - r1) * rand()
            eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if eh < h and ew < w:
                y0, x0 = randint(h - eh), randint(w - ew)
                x[:, y0:y0 + eh, x0:x0 + ew] = MEAN[:, None, None]
                break
    return x


@pytest.mark.parametrize("size", [(32, 16), (64, 32), (40, 24)])
def test_train_transform_matches_reference(size):
    h, w = size
    t = TrainTransform(h, w)
    for seed in range(40):
        img = _image(seed=seed)
        got = t(img, torch.Generator().manual_seed(seed))
        want = _reference_train(img, h, w, torch.Generator().manual_seed(seed))
        assert got.dtype == torch.float32 and got.shape == (3, h, w)
        np.testing.assert_allclose(got.numpy(), want, atol=2e-6)


def test_erasing_box_properties():
    h, w = 64, 32
    t = TrainTransform(h, w, flip_p=0.0, pad=0, erase_p=1.0)
    base = TestTransform(h, w)
    img = _image(80, 40, seed=1)
    clean = base(img)
    fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    for seed in range(200):
        out = t(img, torch.Generator().manual_seed(seed))
        changed = (out != clean).any(0)
        ys, xs = torch.nonzero(changed, as_tuple=True)
        bh, bw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        box = out[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert torch.equal(box, fill.expand_as(box))              # exactly the raw ImageNet means
        assert bh < h and bw < w
        # h = round(sqrt(A r)), w = round(sqrt(A / r)) with A/(H*W) in [0.02, 0.4], r in [0.3, 1/0.3]
        assert (bh - 0.5) * (bw - 0.5) <= 0.4 * h * w and (bh + 0.5) * (bw + 0.5) >= 0.02 * h * w
        assert (bh + 0.5) / (bw - 0.5) >= 0.3 and (bh - 0.5) / (bw + 0.5) <= 1 / 0.3

def test_random_parts_frequencies():
    img = _image(seed=2)
    clean = TestTransform(32, 16)(img)
    g = torch.Generator().manual_seed(0)
    n, fill = 400, torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    erase_only, flip_only = TrainTransform(32, 16, flip_p=0.0, pad=0), TrainTransform(32, 16, pad=0, erase_p=0.0)
    erased = sum(bool((erase_only(img, g) == fill).all(0).any()) for _ in range(n))
    outs = [flip_only(img, g) for _ in range(n)]
    flipped = sum(torch.equal(o, clean.flip(-1)) for o in outs)
    assert all(torch.equal(o, clean) or torch.equal(o, clean.flip(-1)) for o in outs)
    # binomial(400, 0.5): 4.5 sigma band
    assert abs(erased - n / 2) < 45 and abs(flipped - n / 2) < 45

def test_test_transform_and_tensor_input():
    img = _image(50, 30, seed=3)
    got = TestTransform(64, 32)(img)
    np.testing.assert_allclose(got.numpy(), _norm(img.resize((32, 64), Image.BICUBIC)), atol=2e-6)
    same = TestTransform(50, 30)(img)                              # no resize when the size matches
    np.testing.assert_allclose(same.numpy(), _norm(img), atol=2e-6)


def test_bad_parameters():
    with pytest.raises(ValueError, match="height=0"):
        TrainTransform(0, 16)
    with pytest.raises(ValueError, match="area"):
        TrainTransform(32, 16, erase_area=(0.5, 0.1))
    with pytest.raises(ValueError, match="flip_p"):
        TrainTransform(32, 16, flip_p=1.5)
    with pytest.raises(ValueError, match="3x32x16 uint8 tensor"):
        TrainTransform(32, 16)(torch.zeros(3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("erase_p", [0.0, 0.5, 1.0])
def test_batch_views_are_the_bits_of_image_by_image_views(erase_p):
    """apply_views (the train loader's collate: one normalisation per batch) gives exactly the
    tensors apply_view gives image by image, for every flip, crop and erasing box drawn."""
    from fastmmt.data.augment import AugmentSpec, draw_view
    from fastmmt.data.transforms import apply_view, apply_views, shift_view

    spec = AugmentSpec(32, 16, pad=4, erase_p=erase_p)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (24, 3, 32, 16), dtype=torch.uint8, generator=g)
    views = [draw_view(spec, g) for _ in range(len(images))]
    one_by_one = torch.stack([apply_view(x, v, spec) for x, v in zip(images, views)])
    batch = apply_views(torch.stack([shift_view(x, v, spec) for x, v in zip(images, views)]), views, spec)
    assert batch.dtype == torch.float32 and torch.equal(batch, one_by_one)
    assert erase_p == 0.0 or any(v.erase[2] for v in views)  # the erasing path ran


SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 11, 2**63 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_fast_stream_draws_torchs_numbers(seed):
    """TorchCPUStream gives the numbers torch.Generator().manual_seed(seed) gives, for float64
    rand, small and >= 2**32 randint ranges, over many more words than one block."""
    from fastmmt.data.augment import TorchCPUStream

    g, fast = torch.Generator().manual_seed(seed), TorchCPUStream(seed)
    for i in range(300):
        if i % 3 == 0:
            assert fast.rand() == float(torch.rand((), generator=g, dtype=torch.float64))
        elif i % 3 == 1:
            n = 1 + i % 41
            assert fast.randint(n) == int(torch.randint(0, n, (), generator=g))
        else:
            n = 2**33 + i
            assert fast.randint(n) == int(torch.randint(0, n, (), generator=g))


def test_fast_streams_interleaved_and_image_views_match_torch():
    """Two streams drawn in turn each keep their own sequence; image_views (the loaders' draws)
    equals the views drawn from a torch generator with the same seed, erasing boxes that need
    many tries included."""
    from fastmmt.data.augment import AugmentSpec, TorchCPUStream, draw_view, image_views

    a, b = TorchCPUStream(5), TorchCPUStream(6)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    for _ in range(70):  # past two blocks each
        assert a.rand() == float(torch.rand((), generator=ga, dtype=torch.float64))
        assert b.randint(17) == int(torch.randint(0, 17, (), generator=gb))
    specs = [AugmentSpec(64, 32), AugmentSpec(32, 16, pad=4, erase_p=1.0),
             AugmentSpec(16, 8, erase_p=1.0, erase_area=(0.3, 0.9), erase_min_aspect=0.1)]  # many failed tries
    rng = np.random.default_rng(0)
    for spec in specs:
        for seed in rng.integers(0, 2**63 - 1, size=200, dtype=np.int64).tolist():
            g = torch.Generator().manual_seed(seed)
            assert image_views(spec, seed, 2) == [draw_view(spec, g), draw_view(spec, g)]
