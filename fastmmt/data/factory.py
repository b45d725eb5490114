"""Choose the input pipeline: DALI wherever it imports and runs, the torch reference otherwise.

``backend="auto"`` picks ``"dali"`` when NVIDIA DALI is importable and, when the DALI loaders
would run on the GPU (CUDA present and no ``device="cpu"``), one tiny GPU pipeline built and run
once per process succeeds (DALI's CUDA build needs a recent driver: an older one fails only when
a pipeline runs); else ``"torch"``, with one warning naming the reason; in a single process and
under torchrun alike. ``"dali"`` and ``"torch"`` force one. Both training loaders share one
interface (``epoch(epoch, iters)``, ``set_labels``, :class:`~fastmmt.data.TrainBatch`), one batch
plan and one augmentation, and both test loaders yield ``(images, pids, camids, indices)`` in
record order, so callers never branch.
Keyword options only the DALI loaders know (``on_error``, ``device``, ``channels_last``,
``cache``, ``prefetch``, ...) go in ``dali_options`` and are rejected with the torch backend.
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from fastmmt.data import loaders as torch_loaders
from fastmmt.data.augment import AugmentSpec
from fastmmt.data.decoded_cache import DecodedImageCache
from fastmmt.data.records import ImageRecord

BACKENDS = ("auto", "dali", "torch")


def _dali_import_error() -> Exception | None:
    """Why DALI does not import (None when it does); DALI is imported on first use (it is slow to import)."""
    from fastmmt.data.dali_ops import DALI_IMPORT_ERROR
    return DALI_IMPORT_ERROR


def dali_available() -> bool:
    """Whether NVIDIA DALI imports in this environment."""
    return _dali_import_error() is None


def _run_gpu_probe() -> None:
    """Build and run DALI's GPU test graph on one tiny JPEG; raise whatever stops it."""
    from PIL import Image

    from fastmmt.data.dali import DaliTestLoader

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.jpg")
        Image.new("RGB", (8, 16), (120, 60, 30)).save(path, format="JPEG")
        batches = list(DaliTestLoader([ImageRecord(path, 0, 0)], 16, 8, batch_size=1, workers=1, device="gpu"))
        images = batches[0][0]
        if tuple(images.shape) != (1, 3, 16, 8) or not bool(torch.isfinite(images).all()):
            raise RuntimeError(f"the probe pipeline returned {tuple(images.shape)} (finite: "
                               f"{bool(torch.isfinite(images).all())}) for one 16 x 8 image")


@functools.lru_cache(maxsize=None)
def dali_gpu_probe() -> str | None:
    """Why DALI's GPU pipeline cannot run here, or None when it ran (probed once per process)."""
    try:
        _run_gpu_probe()
    except Exception as err:  # driver too old, no nvJPEG, out of memory, ...: all mean "cannot run"
        text = str(err).strip()
        return f"{type(err).__name__}: {text.splitlines()[0] if text else '(no message)'}"
    return None


def _dali_would_use_gpu(device: str | None) -> bool:
    """The DALI loaders' own device rule: ``gpu`` when asked, or by default when CUDA is present."""
    return device == "gpu" or (device is None and torch.cuda.is_available())


@functools.lru_cache(maxsize=None)
def _warn_gpu_fallback(reason: str) -> None:
    warnings.warn(f"data.backend='auto': DALI's GPU pipeline cannot run on this machine ({reason}); "
                  "using the torch loader instead (data.backend='dali' would fail the same way)",
                  RuntimeWarning, stacklevel=3)


def resolve_data_backend(backend: str = "auto", device: str | None = None) -> str:
    """``"auto"`` -> ``"dali"`` if DALI imports (and, for a GPU ``device``, a probe pipeline ran)
    else ``"torch"``; validates explicit choices. ``device``: the DALI loaders' ``device`` option."""
    if backend not in BACKENDS:
        raise ValueError(f"data backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not dali_available():
            return "torch"
        if _dali_would_use_gpu(device):
            reason = dali_gpu_probe()
            if reason is not None:
                _warn_gpu_fallback(reason)
                return "torch"
        return "dali"
    if backend == "dali" and not dali_available():
        raise ImportError(f"backend='dali' requested but NVIDIA DALI does not import "
                          f"({_dali_import_error()}); use backend='torch'")
    return backend


def pin_for(local_rank: int | None) -> bool:
    """Whether the torch loaders pin their batches: when they feed a CUDA device (``local_rank``),
    so each step's host-to-device copy is asynchronous instead of a sync."""
    return local_rank is not None and torch.cuda.is_available()


def _torch_only(dali_options: dict[str, Any]) -> None:
    if dali_options:
        raise TypeError(f"options {sorted(dali_options)} exist only for the DALI backend")


def build_train_loader(records: Sequence[ImageRecord], labels: np.ndarray, height: int, width: int,
                       batch_size: int = 64, num_instances: int = 4, num_views: int = 1,
                       workers: int = 2, seed: int = 0, erase: bool = True, backend: str = "auto",
                       rank: int = 0, world_size: int = 1, local_rank: int | None = None,
                       augment: AugmentSpec | None = None, decoded_cache: DecodedImageCache | None = None,
                       **dali_options: Any):
    """A P x K training loader (:class:`DaliTrainLoader` or :class:`TorchTrainLoader`).

    ``rank``/``world_size``: the loader yields this rank's share of each global ``batch_size``
    batch (both backends: one :class:`~fastmmt.data.sampler.BatchPlanner` plan). ``local_rank``:
    the CUDA device a DALI pipeline decodes on (the training device of the rank; the torch loader
    makes CPU tensors, pinned for that device). ``augment``: the AugmentSpec (default: the recipe at HxW).
    ``decoded_cache``: decode each image once for the run (:func:`build_decoded_cache`, made
    for the same backend).
    """
    args = (records, labels, height, width, batch_size, num_instances, num_views, workers, seed, erase,
            rank, world_size)
    if resolve_data_backend(backend, dali_options.get("device")) == "dali":
        from fastmmt.data.dali import DaliTrainLoader
        return DaliTrainLoader(*args, augment=augment, device_id=local_rank, decoded_cache=decoded_cache,
                               **dali_options)
    _torch_only(dali_options)
    return torch_loaders.TorchTrainLoader(*args, augment=augment, decoded_cache=decoded_cache,
                                          pin_memory=pin_for(local_rank))


def build_test_loader(records: Sequence[ImageRecord], height: int, width: int, batch_size: int = 128,
                      workers: int = 2, backend: str = "auto", local_rank: int | None = None,
                      decoded_cache: DecodedImageCache | None = None, persistent: bool = False,
                      **dali_options: Any) -> Iterable:
    """An ordered extraction loader yielding ``(images, pids, camids, indices)`` batches, the
    last partial batch included, iterable any number of times.

    ``local_rank``: the CUDA device a DALI pipeline decodes on (the torch loader pins for it).
    ``decoded_cache``: decode each image once for the run. ``persistent``: torch worker
    processes stay alive between passes (a loader built once per run; DALI's pipeline always
    does)."""
    if resolve_data_backend(backend, dali_options.get("device")) == "dali":
        from fastmmt.data.dali import DaliTestLoader
        return DaliTestLoader(records, height, width, batch_size, workers, device_id=local_rank,
                              decoded_cache=decoded_cache, **dali_options)
    _torch_only(dali_options)
    return torch_loaders.build_torch_test_loader(records, height, width, batch_size, workers,
                                                 decoded_cache=decoded_cache, persistent=persistent,
                                                 pin_memory=pin_for(local_rank))


def build_decoded_cache(records: Sequence[ImageRecord], backend: str = "auto", max_bytes: int | None = None,
                        dali_device: str | None = None,
                        input_size: tuple[int, int] | None = None) -> DecodedImageCache:
    """A decoded-image cache for ``records`` and the loaders of ``backend`` (``"torch"``:
    Pillow's decoder; ``"dali"``: DALI's on ``dali_device``, the GPU when CUDA is available).
    Share it between the training loader and the extraction loader of the same images.
    ``max_bytes``: the memory bound (None: half the available memory). ``input_size``: the
    (height, width) all the torch loaders of the cache read, so images are stored resized where
    that is smaller (DALI resizes in its own graph and ignores it)."""
    if resolve_data_backend(backend, dali_device) == "dali":
        from fastmmt.data.dali import dali_decoder
        return DecodedImageCache([r.path for r in records], decoder=dali_decoder(dali_device), max_bytes=max_bytes)
    return DecodedImageCache([r.path for r in records], decoder="pillow", max_bytes=max_bytes, input_size=input_size)
