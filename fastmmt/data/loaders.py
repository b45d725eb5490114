"""The plain-torch input pipeline: a P x K training loader with any number of augmented views
per image, and an ordered test loader."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastmmt.data.augment import AugmentSpec, ViewDraw, image_views, loader_spec
from fastmmt.data.decoded_cache import DecodedCacheError, DecodedImageCache
from fastmmt.data.image_io import load_image
from fastmmt.data.records import ImageRecord
from fastmmt.data.sampler import BatchPlanner, PlannedLabels
from fastmmt.data.transforms import TestTransform, apply_views, as_uint8, normalize, shift_view


class TrainBatch(NamedTuple):
    """One P x K batch: ``views[v]`` is Bx3xHxW (view v of every image), labels/camids/indices B."""

    views: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    camids: torch.Tensor
    indices: torch.Tensor


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers share the 2 cores with the training process


class _Images:
    """Decoded images by index: from the file every time, or once through a decoded-image cache
    (whose images stored at the input size come back as resized 3xHxW uint8 tensors)."""

    def __init__(self, paths: list[str], cache: DecodedImageCache | None, height: int, width: int) -> None:
        self.paths, self.cache = paths, cache
        if cache is not None:
            cache.check_decoder("pillow")
            if cache.input_size not in (None, (height, width)):
                raise DecodedCacheError(f"this loader reads {height}x{width} images but the decoded-image cache "
                                        f"stores them resized to {cache.input_size[0]}x{cache.input_size[1]}")
            self.slots = cache.slots(paths)

    def __call__(self, index: int) -> Image.Image | torch.Tensor:
        if self.cache is None:
            return load_image(self.paths[index])
        slot = int(self.slots[index])
        arr = self.cache.pillow_image(slot)
        return torch.from_numpy(arr).permute(2, 0, 1) if self.cache.resized[slot] else Image.fromarray(arr)


class _AugmentedImages(Dataset):
    """Item ``(index, seed)`` -> (num_views (flipped and cropped uint8 image, its draw), index);
    the views are drawn from the image's seed (:func:`~fastmmt.data.augment.image_views`), so
    results do not depend on the number of workers. :func:`_collate` normalises and erases a
    whole batch at once."""

    def __init__(self, paths: list[str], spec: AugmentSpec, num_views: int,
                 cache: DecodedImageCache | None = None) -> None:
        self.paths, self.spec, self.num_views = paths, spec, num_views
        self.image = _Images(paths, cache, spec.height, spec.width)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], int]:
        index, seed = item
        base = as_uint8(self.image(index), self.spec.height, self.spec.width)
        return tuple((shift_view(base, v, self.spec), v) for v in image_views(self.spec, seed, self.num_views)), index


class _BatchList:
    """The batch sampler handed to DataLoader: replays the batches planned for the current epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Collate:
    """Stack a batch's views and normalise + erase each view's batch in one pass
    (:func:`~fastmmt.data.transforms.apply_views`: the bits of image-by-image augmentation)."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec

    def __call__(self, items: list[tuple[tuple[tuple[torch.Tensor, ViewDraw], ...], int]]
                 ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        views = tuple(apply_views(torch.stack([img for img, _ in v]), [d for _, d in v], self.spec)
                      for v in zip(*(it[0] for it in items)))
        return views, torch.tensor([it[1] for it in items], dtype=torch.int64)


class TorchTrainLoader(PlannedLabels):
    """Reference training loader: the P x K batches (``batch_size = P*K``) of a
    :class:`~fastmmt.data.sampler.BatchPlanner` over the current labels, each image augmented
    ``num_views`` times independently (``augment``: an AugmentSpec, default the recipe at HxW;
    ``erase=False`` turns erasing off).

    ``labels[i]`` is the (pseudo-)label of ``records[i]``; -1 excludes the image. Batches are
    deterministic given (seed, epoch) whatever ``workers`` is. With ``world_size > 1`` (one loader
    per rank) each batch is this ``rank``'s share of the global ``batch_size`` batch, images and
    augmentations identical to the single-process ones. ``decoded_cache`` (a ``"pillow"``
    :class:`~fastmmt.data.decoded_cache.DecodedImageCache` holding these records' paths): each
    image is decoded once for the run, batches unchanged. ``pin_memory``: views and labels come in
    page-locked memory, so their copies to a CUDA device are asynchronous (``non_blocking=True``).
    """

    def __init__(self, records: Sequence[ImageRecord], labels: np.ndarray, height: int, width: int,
                 batch_size: int = 64, num_instances: int = 4, num_views: int = 1, workers: int = 2,
                 seed: int = 0, erase: bool = True, rank: int = 0, world_size: int = 1, *,
                 augment: AugmentSpec | None = None, decoded_cache: DecodedImageCache | None = None,
                 pin_memory: bool = False) -> None:
        if num_views < 1 or workers < 0:
            raise ValueError(f"need num_views >= 1 and workers >= 0, got {num_views} and {workers}")
        self.records = list(records)
        self.camids = np.array([r.camid for r in self.records], dtype=np.int64)
        self.planner = BatchPlanner(labels, self.camids, batch_size, num_instances, seed, rank, world_size)
        self.spec = loader_spec(height, width, erase, augment)
        self._dataset = _AugmentedImages([r.path for r in self.records], self.spec, num_views, decoded_cache)
        self._batches = _BatchList()
        self._workers = workers
        self.pin_memory = pin_memory
        self._loader: DataLoader | None = None

    def _get_loader(self) -> DataLoader:
        if self._loader is None:
            extra = dict(persistent_workers=True, worker_init_fn=_single_thread_worker) if self._workers else {}
            self._loader = DataLoader(self._dataset, batch_sampler=self._batches, num_workers=self._workers,
                                      collate_fn=_Collate(self.spec), pin_memory=self.pin_memory, **extra)
        return self._loader

    def epoch(self, epoch: int, iters: int) -> Iterator[TrainBatch]:
        """Exactly ``iters`` batches for ``epoch`` (labels are read when the call starts)."""
        plan = self.planner.plan(epoch, iters)
        self._batches.batches = [list(zip(i.tolist(), s.tolist())) for i, s in zip(plan.indices, plan.seeds)]
        labels = torch.from_numpy(self.labels.copy())
        camids = torch.from_numpy(self.camids)
        for views, indices in self._get_loader():
            batch_labels = labels[indices]
            yield TrainBatch(views, batch_labels.pin_memory() if self.pin_memory else batch_labels, camids[indices],
                             indices)


class _TestImages(Dataset):
    """Item ``i`` -> (the resized 3xHxW uint8 image, pid, camid, i); normalised per batch by
    :func:`_collate_test` (one pass over the batch instead of one float copy per image)."""

    def __init__(self, records: list[ImageRecord], transform: TestTransform,
                 cache: DecodedImageCache | None = None) -> None:
        self.records, self.transform = records, transform
        self.image = _Images([r.path for r in records], cache, transform.height, transform.width)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        r = self.records[i]
        return as_uint8(self.image(i), self.transform.height, self.transform.width), r.pid, r.camid, i


def _collate_test(items: list[tuple[torch.Tensor, int, int, int]]) -> tuple[torch.Tensor, ...]:
    """Stack the batch's uint8 images and normalise them at once (the same float32 operations
    as per image, so the same values)."""
    images = normalize(torch.stack([it[0] for it in items]))
    pids, camids, indices = (torch.tensor([it[k] for it in items], dtype=torch.int64) for k in (1, 2, 3))
    return images, pids, camids, indices


def build_torch_test_loader(records: Sequence[ImageRecord], height: int, width: int, batch_size: int = 128,
                            workers: int = 2, decoded_cache: DecodedImageCache | None = None,
                            persistent: bool = False, pin_memory: bool = False) -> DataLoader:
    """Batches ``(images, pids, camids, indices)`` in record order, last partial batch included.

    ``decoded_cache``: decode each image once for the run (see :class:`TorchTrainLoader`).
    ``persistent``: keep the worker processes between passes (for a loader built once per run
    and iterated every epoch). ``pin_memory``: batches in page-locked memory (asynchronous copies
    to a CUDA device)."""
    if batch_size <= 0 or workers < 0:
        raise ValueError(f"need batch_size > 0 and workers >= 0, got {batch_size} and {workers}")
    extra = dict(worker_init_fn=_single_thread_worker, persistent_workers=persistent) if workers else {}
    return DataLoader(_TestImages(list(records), TestTransform(height, width), decoded_cache), batch_size=batch_size,
                      shuffle=False, num_workers=workers, drop_last=False, pin_memory=pin_memory,
                      collate_fn=_collate_test, **extra)
