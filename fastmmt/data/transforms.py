"""Training and test image transforms (Pillow + NumPy + torch, no torchvision).

Training: the augmentation of :class:`~fastmmt.data.augment.AugmentSpec`, its random draws from
:func:`~fastmmt.data.augment.draw_view` (the DALI pipeline draws the same way). Flip, pad and
crop act on the uint8 image before normalisation; this is exactly the PIL order of the reference
(a zero pad in PIL is 0 in [0, 1] is ``-mean/std`` after normalisation).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from fastmmt.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSpec,
    ViewDraw,
    check_size,
    draw_view,
    normalize_constants,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TestTransform", "TrainTransform", "apply_view", "apply_views",
           "as_uint8", "normalize", "resize_to_tensor", "shift_view"]


def resize_to_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL bicubic resize to ``height x width``; returns a 3xHxW uint8 tensor."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """uint8 3xHxW or Bx3xHxW (CPU) -> float32 ``(x / 255 - mean) / std`` per channel, computed as
    ``(x - 255*mean) * (1 / (255*std))`` in float32 (:func:`~fastmmt.data.augment.normalize_constants`,
    bit-identical to the DALI pipeline's normalisation).

    Computed with numpy: per-image work must not enter torch's intra-op thread pool, which
    stalls badly when the cores are busy (bench/RESULTS.md).
    """
    shift, scale = normalize_constants(mean, std)
    arr = x.numpy().astype(np.float32)
    arr -= shift[:, None, None]
    arr *= scale[:, None, None]
    return torch.from_numpy(arr)


def _shift_crop(x: np.ndarray, pad: int, top: int, left: int) -> np.ndarray:
    """Crop ``x.shape`` at (top, left) from ``x`` zero-padded by ``pad``: a zero-filled shift."""
    _, h, w = x.shape
    dy, dx = pad - top, pad - left
    out = np.zeros_like(x)
    if abs(dy) < h and abs(dx) < w:  # otherwise the crop sees only padding
        out[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
            x[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def as_uint8(img: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A PIL image resized, or an already resized 3xHxW uint8 tensor checked."""
    if not isinstance(img, torch.Tensor):
        return resize_to_tensor(img, height, width)
    if img.dtype != torch.uint8 or tuple(img.shape) != (3, height, width):
        raise ValueError(f"expected a 3x{height}x{width} uint8 tensor, got {img.dtype} {tuple(img.shape)}")
    return img


def shift_view(x: torch.Tensor, view: ViewDraw, spec: AugmentSpec) -> torch.Tensor:
    """The geometric part of ``view`` on a resized 3xHxW uint8 image: flip, zero pad + crop
    (uint8, 3xHxW, contiguous)."""
    arr = x.numpy()
    if view.flip:
        arr = arr[:, :, ::-1]
    if spec.pad > 0:
        arr = _shift_crop(arr, spec.pad, view.top, view.left)
    return torch.from_numpy(np.ascontiguousarray(arr))


def apply_view(x: torch.Tensor, view: ViewDraw, spec: AugmentSpec) -> torch.Tensor:
    """The view ``view`` of a resized 3xHxW uint8 image: flip, zero pad + crop, normalise,
    erase (``spec.erase_fill`` written into the normalised tensor); float32 3xHxW."""
    return apply_views(shift_view(x, view, spec)[None], [view], spec)[0]


def apply_views(shifted: torch.Tensor, views: Sequence[ViewDraw], spec: AugmentSpec) -> torch.Tensor:
    """A batch of :func:`apply_view`: ``shifted`` (Bx3xHxW uint8, each image's :func:`shift_view`)
    normalised in one pass, then each image's box erased. The same bits as image by image."""
    out = normalize(shifted, spec.mean, spec.std)
    arr, fill = out.numpy(), np.asarray(spec.erase_fill, dtype=np.float32)[:, None, None]
    for i, (_, _, _, (top, left, h, w)) in enumerate(views):
        if h:
            arr[i, :, top:top + h, left:left + w] = fill
    return out


class TrainTransform:
    """The training augmentation of :class:`~fastmmt.data.augment.AugmentSpec`; ``__call__``
    returns a normalised 3xHxW float32 tensor.

    ``TrainTransform(height, width, **changes)``: the spec at HxW with ``changes`` to its
    defaults (e.g. ``erase_p=0.0``). The random draws come from ``generator`` in the order of
    :func:`~fastmmt.data.augment.draw_view`.
    """

    def __init__(self, height: int, width: int, **changes) -> None:
        self.spec = AugmentSpec(height, width, **changes)

    @property
    def height(self) -> int:
        return self.spec.height

    @property
    def width(self) -> int:
        return self.spec.width

    def __call__(self, img: Image.Image | torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a PIL image (or an already resized 3xHxW uint8 tensor)."""
        x = as_uint8(img, self.spec.height, self.spec.width)
        return apply_view(x, draw_view(self.spec, generator), self.spec)

    def __repr__(self) -> str:
        return f"TrainTransform({self.spec})"


class TestTransform:
    """Test-time transform: PIL bicubic resize to HxW + ImageNet normalisation."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, height: int, width: int) -> None:
        check_size(height, width)
        self.height, self.width = height, width

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return normalize(as_uint8(img, self.height, self.width))

    def __repr__(self) -> str:
        return f"TestTransform({self.height}x{self.width})"
