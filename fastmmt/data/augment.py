"""The training augmentation, specified once, and the random draws of one augmented view.

Both input pipelines read :class:`AugmentSpec` and draw every view with :func:`draw_view`:
the torch :class:`~fastmmt.data.TrainTransform` applies the draws with NumPy on the CPU, the DALI
graph (:mod:`fastmmt.data.dali_ops`) applies the same draws fed through ``external_source``.
A view is a pure function of (spec, generator state), so for the same per-image seed the two
pipelines draw identical flips, crops and erasing boxes.

The spec (MMT's training augmentation): resize to HxW (bicubic) -> horizontal flip with
probability ``flip_p`` -> zero-pad ``pad`` pixels on every side -> random HxW crop -> to [0, 1]
-> normalise with ``mean``/``std`` -> random erasing with probability ``erase_p`` (area fraction
uniform in ``erase_area``, aspect uniform in ``[erase_min_aspect, 1/erase_min_aspect]``, up to
``erase_tries`` tries; ``erase_fill`` written AS IS into the normalised tensor).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(shift, scale)`` with ``normalised = (x - shift) * scale`` for uint8
    ``x``: ``shift = 255*mean``, ``scale = 1/(255*std)``, rounded once from float64. This is the
    arithmetic of DALI's ``crop_mirror_normalize`` given ``255*mean`` and ``255*std`` on the CPU,
    so both pipelines produce the same bits from the same pixels."""
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (255.0 * m).astype(np.float32), (1.0 / (255.0 * s)).astype(np.float32)


def check_size(height: int, width: int) -> None:
    """Raise ValueError unless the image size is positive."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")


@dataclass(frozen=True)
class AugmentSpec:
    """Every parameter of the training augmentation (defaults: the MMT recipe).

    ``erase_fill`` defaults to the raw ImageNet mean values, which is what the MMT reference
    writes (``RandomErasing(mean=[0.485, 0.456, 0.406])`` placed after ``Normalize``), not 0.
    """

    height: int
    width: int
    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_min_aspect: float = 0.3
    erase_tries: int = 100
    erase_fill: tuple[float, float, float] = IMAGENET_MEAN
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_size(self.height, self.width)
        if self.pad < 0 or not 0.0 <= self.flip_p <= 1.0 or not 0.0 <= self.erase_p <= 1.0:
            raise ValueError(f"bad augmentation parameters: pad={self.pad}, flip_p={self.flip_p}, "
                             f"erase_p={self.erase_p}")
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi <= 1.0 or not 0.0 < self.erase_min_aspect <= 1.0 or self.erase_tries < 1:
            raise ValueError(f"bad erasing parameters: area={self.erase_area}, "
                             f"min_aspect={self.erase_min_aspect}, tries={self.erase_tries}")
        for name in ("erase_fill", "mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 channel values, got {getattr(self, name)}")
        object.__setattr__(self, "erase_area", tuple(self.erase_area))
        for name in ("erase_fill", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def without_erasing(self) -> AugmentSpec:
        """The same spec with erasing off (MMT's pre-training stage)."""
        return replace(self, erase_p=0.0)

    def off(self) -> AugmentSpec:
        """No flip, no crop shift, no erasing: a view is the resized, normalised image."""
        return replace(self, flip_p=0.0, pad=0, erase_p=0.0)


def loader_spec(height: int, width: int, erase: bool = True, augment: AugmentSpec | None = None) -> AugmentSpec:
    """The augmentation a training loader applies: ``augment`` (its size must be HxW), by
    default the recipe at HxW; ``erase=False`` turns erasing off either way."""
    spec = augment if augment is not None else AugmentSpec(height, width)
    if (spec.height, spec.width) != (height, width):
        raise ValueError(f"augment is for {spec.height}x{spec.width} images but the loader makes "
                         f"{height}x{width}")
    return spec if erase else spec.without_erasing()


class ViewDraw(NamedTuple):
    """The random part of one augmented view: flip, the crop's (top, left) in the padded image
    (each in ``[0, 2*pad]``), and the erased box (top, left, h, w), all zero when not erased."""

    flip: bool
    top: int
    left: int
    erase: tuple[int, int, int, int]


_TWISTERS = threading.local()  # one NumPy MT19937 per thread, re-seeded per stream (making one costs more than a view)


class TorchCPUStream:
    """The draws of ``torch.Generator().manual_seed(seed)`` (torch's CPU generator, a Mersenne
    Twister) as :func:`draw_view` takes them, from NumPy's ``MT19937`` in blocks of raw words
    instead of one torch call per number: the same numbers (tests compare them with torch's
    generator), several times cheaper per image.

    torch seeds the twister with the low 32 bits of the seed (the reference ``init_genrand``, which
    ``MT19937._legacy_seeding`` is); a float64 ``torch.rand`` is the low 53 bits of two words
    (first word high) times 2**-53; ``torch.randint(0, n)`` is one word modulo ``n`` (two words for
    ``n >= 2**32``). Streams share their thread's twister: one that was interleaved with another
    re-seeds it and skips the words it has already used.
    """

    BLOCK = 32  # raw 32-bit words fetched at once (one view takes about 6-12)

    def __init__(self, seed: int) -> None:
        self._seed = int(seed) & 0xFFFFFFFF
        self._words: list[int] = []
        self._next = 0
        self._blocks = 0  # blocks fetched so far

    def _fill(self) -> None:
        twister = getattr(_TWISTERS, "mt", None)
        if twister is None:
            twister = _TWISTERS.mt = np.random.MT19937(0)
        if getattr(_TWISTERS, "owner", None) is not self:
            twister._legacy_seeding(self._seed)
            if self._blocks:
                twister.random_raw(self._blocks * self.BLOCK)
            _TWISTERS.owner = self
        self._words, self._next = twister.random_raw(self.BLOCK).tolist(), 0
        self._blocks += 1

    def _word(self) -> int:
        if self._next == len(self._words):
            self._fill()
        self._next += 1
        return self._words[self._next - 1]

    def _word64(self) -> int:
        return (self._word() << 32) | self._word()

    def rand(self) -> float:
        """``float(torch.rand((), dtype=torch.float64))``: uniform in [0, 1)."""
        return (self._word64() & ((1 << 53) - 1)) * 2.0 ** -53

    def randint(self, high: int) -> int:
        """``int(torch.randint(0, high, ()))``: uniform in [0, high)."""
        return (self._word64() if high >= 1 << 32 else self._word()) % high


Generator = torch.Generator | TorchCPUStream | None  # None: torch's default generator


def _rand(generator: Generator) -> float:
    if isinstance(generator, TorchCPUStream):
        return generator.rand()
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high_inclusive: int, generator: Generator) -> int:
    if isinstance(generator, TorchCPUStream):
        return generator.randint(high_inclusive + 1)
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


NO_ERASE = (0, 0, 0, 0)


def draw_view(spec: AugmentSpec, generator: Generator = None) -> ViewDraw:
    """Draw one view's parameters from ``generator`` (a ``torch.Generator``, a
    :class:`TorchCPUStream`, or torch's default generator when None).

    Draws, in this order: the flip coin; the crop top, then left, uniform in ``[0, 2*pad]``
    (no draw when ``pad == 0``); the erasing coin; then up to ``erase_tries`` times an area
    fraction uniform in ``erase_area`` and an aspect ratio ``r`` uniform in
    ``[min_aspect, 1/min_aspect]``, ``h = round(sqrt(A*r))``, ``w = round(sqrt(A/r))`` (Python
    round) for the target area ``A`` in pixels; the first box with ``h < H`` and ``w < W`` is
    placed with its top-left corner uniform in ``[0, H-h] x [0, W-w]`` (top first). No box
    fits: no erasing. These are the rules of the reference code's ``RandomErasing``.
    """
    flip = _rand(generator) < spec.flip_p
    top = left = 0
    if spec.pad > 0:
        top, left = _randint(2 * spec.pad, generator), _randint(2 * spec.pad, generator)
    if _rand(generator) >= spec.erase_p:
        return ViewDraw(flip, top, left, NO_ERASE)
    h_img, w_img = spec.height, spec.width
    lo, hi = spec.erase_area
    r0 = spec.erase_min_aspect
    for _ in range(spec.erase_tries):
        target = (lo + (hi - lo) * _rand(generator)) * h_img * w_img
        aspect = r0 + (1.0 / r0 - r0) * _rand(generator)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if h < h_img and w < w_img:
            return ViewDraw(flip, top, left, (_randint(h_img - h, generator), _randint(w_img - w, generator), h, w))
    return ViewDraw(flip, top, left, NO_ERASE)


def image_views(spec: AugmentSpec, seed: int, num_views: int) -> list[ViewDraw]:
    """The ``num_views`` independent views of one image: drawn one after the other from a
    generator seeded with the image's augmentation seed (a :class:`~fastmmt.data.sampler.BatchPlan`
    seed), so a view does not depend on the batch, the rank or the pipeline that draws it. The
    generator is a :class:`TorchCPUStream`: the numbers of ``torch.Generator().manual_seed(seed)``."""
    gen = TorchCPUStream(seed)
    return [draw_view(spec, gen) for _ in range(num_views)]


@dataclass(frozen=True)
class ViewParams:
    """The draws of one view for n images as arrays: ``flip`` (n,) 0/1, ``crop`` (n, 2)
    (top, left), ``erase_anchor`` / ``erase_shape`` (n, 2) the box's (top, left) and (h, w)."""

    flip: np.ndarray
    crop: np.ndarray
    erase_anchor: np.ndarray
    erase_shape: np.ndarray

    @classmethod
    def stack(cls, draws: Sequence[ViewDraw]) -> ViewParams:
        """Arrays of the given per-image draws, in order."""
        flip = np.array([d.flip for d in draws], dtype=np.int32)
        crop = np.array([(d.top, d.left) for d in draws], dtype=np.int64).reshape(-1, 2)
        box = np.array([d.erase for d in draws], dtype=np.int64).reshape(-1, 4)
        return cls(flip, crop, box[:, :2], box[:, 2:])

    def __len__(self) -> int:
        return len(self.flip)


def batch_views(spec: AugmentSpec, seeds: Sequence[int], num_views: int) -> list[ViewParams]:
    """Per view, the arrays of the draws of the images with augmentation ``seeds``
    (:func:`image_views` of each image)."""
    per_image = [image_views(spec, s, num_views) for s in seeds]
    return [ViewParams.stack([views[v] for views in per_image]) for v in range(num_views)]
