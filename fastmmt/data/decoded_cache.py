"""The decoded-image cache: each image decoded once per run, kept as uint8 RGB at its stored size
(or, for the torch loaders, already resized to the input size where that is smaller).

All images live in one flat uint8 buffer (image i is ``H_i x W_i x 3`` at a fixed offset, sized
from the file headers when the cache is made) with a per-image "filled" flag. On the CPU the
buffer and the flags are in shared memory, so ``DataLoader`` worker processes fill and read the
same cache as the main process: the first pass over the images (an extraction, or the first
training epoch) decodes each image once, and every later pass decodes nothing. Augmentation is
untouched: it runs on the decoded image exactly as it would on a freshly decoded one.

Every torch loader of a run starts from the same deterministic step, the PIL bicubic resize to
the input size (:func:`~fastmmt.data.transforms.resize_to_tensor`). A ``"pillow"`` cache given
that ``input_size`` stores an image already resized whenever the resized image is no larger than
the decoded one (the demo's 128x64 crops at 64x32): a quarter of the memory, and no resize on
any later pass. An image the input size would enlarge (Market-1501's 128x64 crops at 256x128)
is stored as decoded. Either way a loader gets the same pixels as without the cache.

A cache belongs to one decoder (:data:`DECODERS`): ``"pillow"`` for the torch loaders, DALI's
CPU or GPU decoder for the DALI loaders. Decoders may differ by a unit on some pixels, and an
image from the cache must equal the one the same loader decodes without it, so a loader refuses
a cache made for another decoder.

The whole set must fit under a memory bound (``max_bytes``; default: half the memory the kernel
reports available); otherwise making the cache fails, naming the sizes, before anything is
decoded.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from fastmmt.data.image_io import load_image
from fastmmt.data.records import DatasetError
from fastmmt.data.transforms import resize_to_tensor

DECODERS = ("pillow", "dali-cpu", "dali-gpu")
CHANNELS = 3  # every decoder here outputs RGB


class DecodedCacheError(DatasetError):
    """The decoded-image cache cannot be made or used as asked (the message says why)."""


def available_memory_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (physical pages times page size where it is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _stored_size(path: str) -> tuple[int, int]:
    """(height, width) from the image header; (0, 0) when the header cannot be read (the image
    then fails with its usual error when it is decoded, and is never cached)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
        return h, w
    except Exception:  # noqa: BLE001 - any unreadable header: left to the decoder's own error
        return 0, 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class DecodedImageCache:
    """Decoded uint8 RGB images of ``paths`` for one ``decoder``, filled on first use.

    ``max_bytes``: the bound on the decoded set (None: half of :func:`available_memory_bytes`).
    ``device``: where the buffer lives, ``"cpu"`` (shared memory, visible to worker processes)
    or a CUDA device (for DALI on the GPU). Images are addressed by slot (their position in
    ``paths``); :meth:`slots` maps a loader's own paths to slots. ``input_size`` (``"pillow"``
    only): the (height, width) every loader of the cache resizes to first; an image it does not
    enlarge is stored resized (``resized[slot]``).
    """

    def __init__(self, paths: Sequence[str], *, decoder: str = "pillow", max_bytes: int | None = None,
                 device: str | torch.device = "cpu", input_size: tuple[int, int] | None = None) -> None:
        if decoder not in DECODERS:
            raise DecodedCacheError(f"unknown decoder {decoder!r} for the decoded-image cache; "
                                    f"choose one of {DECODERS}")
        if input_size is not None and (decoder != "pillow" or min(input_size) < 1):
            raise DecodedCacheError(f"input_size={input_size} needs the 'pillow' decoder and a positive size "
                                    f"(got decoder {decoder!r})")
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise DecodedCacheError("the decoded-image cache needs at least one image")
        self.decoder = decoder
        self.device = torch.device(device)
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        sizes = np.array([_stored_size(p) for p in self.paths], dtype=np.int64).reshape(-1, 2)
        pixels = np.prod(sizes, axis=1)
        # an unreadable header (0 pixels) is never resized: it fails with the decoder's error
        self.resized = np.zeros(len(self.paths), dtype=bool) if input_size is None else \
            pixels >= self.input_size[0] * self.input_size[1]
        if self.input_size is not None:
            pixels = np.where(self.resized, self.input_size[0] * self.input_size[1], pixels)
        self.sizes = pixels * CHANNELS  # bytes of each stored image
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.nbytes = int(self.offsets[-1])
        bound = available_memory_bytes() // 2 if max_bytes is None else int(max_bytes)
        if self.nbytes > bound:
            what = "the bound given (max_bytes)" if max_bytes is not None else \
                "half the memory available now"
            raise DecodedCacheError(
                f"the decoded-image cache does not fit: {len(self.paths)} images need {_mib(self.nbytes)} "
                f"decoded (uint8 RGB at their stored size, or the input size where smaller), over {what}, "
                f"{_mib(bound)}; raise the bound or turn the decoded-image cache off (images are then decoded "
                f"on every pass)")
        self._slot_of = {p: i for i, p in enumerate(self.paths)}
        buf = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, device=self.device)
        flags = torch.zeros(len(self.paths), dtype=torch.uint8)  # host: checked per image by Python
        # (height, width) as decoded: a decoder may rotate by EXIF orientation (same byte count)
        shapes = torch.as_tensor(sizes, dtype=torch.int64).clone()
        if self.device.type == "cpu":
            buf.share_memory_()
        flags.share_memory_()
        shapes.share_memory_()
        self._buf, self._flags, self._shapes = buf, flags, shapes

    def __len__(self) -> int:
        return len(self.paths)

    def slots(self, paths: Sequence[str]) -> np.ndarray:
        """Slot of each path; an error naming the first path the cache was not made for."""
        try:
            return np.array([self._slot_of[str(p)] for p in paths], dtype=np.int64)
        except KeyError as err:
            raise DecodedCacheError(f"image {err.args[0]!r} is not in the decoded-image cache "
                                    f"(made for {len(self.paths)} other images)") from None

    def check_decoder(self, decoder: str) -> None:
        """Refuse a cache filled by another decoder (its pixels may differ from this loader's)."""
        if decoder != self.decoder:
            raise DecodedCacheError(f"this loader decodes with {decoder!r} but the decoded-image cache "
                                    f"was made for {self.decoder!r}; make one cache per decoder")

    @property
    def num_filled(self) -> int:
        """How many images are decoded and stored."""
        return int(self._flags.sum())

    def has(self, slot: int) -> bool:
        """Whether image ``slot`` is stored."""
        return bool(self._flags[slot])

    def get(self, slot: int) -> torch.Tensor:
        """The stored ``H x W x 3`` uint8 image (a view into the cache: do not modify)."""
        if not self._flags[slot]:
            raise KeyError(f"image {self.paths[slot]!r} is not decoded in the cache yet")
        h, w = self._shapes[slot].tolist()
        return self._buf[self.offsets[slot]:self.offsets[slot + 1]].view(h, w, CHANNELS)

    def put(self, slot: int, image: np.ndarray | torch.Tensor) -> bool:
        """Store a decoded ``H x W x 3`` uint8 image; False (not stored) when its size is not
        the one its header announced, so such an image is simply decoded every time."""
        img = torch.from_numpy(np.require(image, requirements="W")) if isinstance(image, np.ndarray) else image
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[2] != CHANNELS:
            raise DecodedCacheError(f"decoded image {self.paths[slot]!r} must be H x W x {CHANNELS} uint8, "
                                    f"got {img.dtype} {tuple(img.shape)}")
        if img.numel() != self.sizes[slot]:
            return False
        a, b = self.offsets[slot], self.offsets[slot + 1]
        self._buf[a:b].view(img.shape).copy_(img)
        self._shapes[slot] = torch.tensor(img.shape[:2])
        self._flags[slot] = 1  # after the pixels: a reader seeing the flag sees the image
        return True

    def pillow_image(self, slot: int) -> np.ndarray:
        """Image ``slot`` as :func:`~fastmmt.data.load_image` decodes it (H x W x 3 uint8) or,
        where ``resized[slot]``, that image resized to ``input_size`` as
        :func:`~fastmmt.data.transforms.resize_to_tensor` resizes it; decoded and stored on first
        use (``"pillow"`` caches only)."""
        self.check_decoder("pillow")
        if self.has(slot):
            return self.get(slot).numpy()
        img = load_image(self.paths[slot])
        if self.resized[slot]:
            arr = resize_to_tensor(img, *self.input_size).permute(1, 2, 0).numpy()
        else:
            arr = np.asarray(img, dtype=np.uint8)
        self.put(slot, arr)
        return arr
