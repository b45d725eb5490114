"""Training and test image transforms (Pillow + torch, no torchvision).

Training (MMT spec, every parameter explicit so the DALI pipeline can match it):
resize to HxW with PIL bicubic -> horizontal flip (p=flip_p) -> zero-pad ``pad`` pixels on every
side -> random HxW crop -> to tensor in [0, 1] -> ImageNet normalise -> random erasing.

Flip, pad and crop act on the uint8 tensor before normalisation; this is exactly the PIL order
of the reference (a zero pad in PIL is 0 in [0, 1] is ``-mean/std`` after normalisation).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")


def resize_to_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL bicubic resize to ``height x width``; returns a 3xHxW uint8 tensor."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """uint8 3xHxW (CPU) -> float32 ``(x / 255 - mean) / std`` per channel.

    Computed with numpy: per-image work must not enter torch's intra-op thread pool, which
    stalls badly when the cores are busy (measured 17x slower on a loaded 2-core machine).
    """
    arr = x.numpy().astype(np.float32) / np.float32(255.0)
    arr -= np.asarray(mean, np.float32)[:, None, None]
    arr /= np.asarray(std, np.float32)[:, None, None]
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


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


def random_erase_(x: torch.Tensor, generator: torch.Generator | None, p: float,
                  area: tuple[float, float], min_aspect: float, tries: int,
                  fill: tuple[float, ...]) -> torch.Tensor:
    """Random erasing (Zhong et al.), as in the reference code, in place on a CxHxW tensor.

    With probability ``p``: up to ``tries`` times draw a target area uniform in ``area`` x H*W and
    an aspect ratio uniform in ``[min_aspect, 1/min_aspect]``; ``h = round(sqrt(A*r))``,
    ``w = round(sqrt(A/r))``; the first box with h < H and w < W is placed with its top-left corner
    uniform in ``[0, H-h] x [0, W-w]`` and filled channel-wise with ``fill``.
    """
    if _rand(generator) >= p:
        return x
    _, h_img, w_img = x.shape
    for _ in range(tries):
        target = (area[0] + (area[1] - area[0]) * _rand(generator)) * h_img * w_img
        aspect = min_aspect + (1.0 / min_aspect - min_aspect) * _rand(generator)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if h < h_img and w < w_img:
            top = _randint(h_img - h, generator)
            left = _randint(w_img - w, generator)
            x[:, top:top + h, left:left + w] = torch.tensor(fill, dtype=x.dtype).view(-1, 1, 1)
            return x
    return x


def _as_uint8(img: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A PIL image resized, or an already resized 3xHxW uint8 tensor checked."""
    if not isinstance(img, torch.Tensor):
        return resize_to_tensor(img, height, width)
    if img.dtype != torch.uint8 or tuple(img.shape) != (3, height, width):
        raise ValueError(f"expected a 3x{height}x{width} uint8 tensor, got {img.dtype} {tuple(img.shape)}")
    return img


class TrainTransform:
    """Spec training augmentation; ``__call__`` returns a normalised 3xHxW float32 tensor.

    Random draws, in this order, from ``generator`` (torch's default generator when None):
    flip coin, crop top in [0, 2*pad], crop left in [0, 2*pad], then the erasing draws (see
    :func:`random_erase_`). ``erase_fill`` is written AS IS into the normalised tensor; the default
    (0.485, 0.456, 0.406) is what the MMT reference writes (``RandomErasing(mean=[0.485, 0.456,
    0.406])`` placed after ``Normalize``), i.e. the raw ImageNet mean values, not 0.
    """

    def __init__(self, height: int, width: int, flip_p: float = 0.5, pad: int = 10,
                 erase_p: float = 0.5, erase_area: tuple[float, float] = (0.02, 0.4),
                 erase_min_aspect: float = 0.3, erase_tries: int = 100,
                 erase_fill: tuple[float, float, float] = IMAGENET_MEAN) -> None:
        _check_size(height, width)
        if pad < 0 or not 0.0 <= flip_p <= 1.0 or not 0.0 <= erase_p <= 1.0:
            raise ValueError(f"bad augmentation parameters: pad={pad}, flip_p={flip_p}, erase_p={erase_p}")
        if not 0.0 < erase_area[0] <= erase_area[1] <= 1.0 or not 0.0 < erase_min_aspect <= 1.0:
            raise ValueError(f"bad erasing parameters: area={erase_area}, min_aspect={erase_min_aspect}")
        self.height, self.width = height, width
        self.flip_p, self.pad = flip_p, pad
        self.erase_p, self.erase_area = erase_p, tuple(erase_area)
        self.erase_min_aspect, self.erase_tries = erase_min_aspect, erase_tries
        self.erase_fill = tuple(erase_fill)

    def __call__(self, img: Image.Image | torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a PIL image (or an already resized 3xHxW uint8 tensor)."""
        x = _as_uint8(img, self.height, self.width).numpy()
        if _rand(generator) < self.flip_p:
            x = x[:, :, ::-1]
        if self.pad > 0:
            top, left = _randint(2 * self.pad, generator), _randint(2 * self.pad, generator)
            x = _shift_crop(x, self.pad, top, left)
        out = normalize(torch.from_numpy(np.ascontiguousarray(x)))
        return random_erase_(out, generator, self.erase_p, self.erase_area,
                             self.erase_min_aspect, self.erase_tries, self.erase_fill)

    def __repr__(self) -> str:
        return (f"TrainTransform({self.height}x{self.width}, flip_p={self.flip_p}, pad={self.pad}, "
                f"erase_p={self.erase_p}, erase_area={self.erase_area}, "
                f"erase_min_aspect={self.erase_min_aspect}, erase_tries={self.erase_tries}, "
                f"erase_fill={self.erase_fill})")


class TestTransform:
    """Test-time transform: PIL bicubic resize to HxW + ImageNet normalisation."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, height: int, width: int) -> None:
        _check_size(height, width)
        self.height, self.width = height, width

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return normalize(_as_uint8(img, self.height, self.width))

    def __repr__(self) -> str:
        return f"TestTransform({self.height}x{self.width})"
