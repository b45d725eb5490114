"""DALI input pipelines with the torch loaders' interface.

:class:`DaliTrainLoader` is a drop-in for :class:`~fastmmt.data.TorchTrainLoader` (same
``epoch(epoch, iters)`` / ``set_labels`` / :class:`TrainBatch`), :class:`DaliTestLoader` for
:func:`~fastmmt.data.build_test_loader`. Python reads the encoded files, validates them and
draws the augmentation; DALI decodes (nvJPEG ``mixed`` on a GPU, libjpeg-turbo on the CPU),
resizes, augments and normalises on its own threads while Python prepares the next batch.

Unreadable images: every file is checked cheaply on read (JPEG/PNG signature and end marker;
anything else is fully decoded by Pillow once). Should DALI still fail on a batch, the batch's
files are decoded with Pillow to find the culprit. ``on_error="fail"`` raises
:class:`ImageReadError` naming the path; ``"skip"`` warns once per path, counts every
occurrence in ``skipped`` and replaces the image by a readable one of the same label (training,
so batches stay P x K) or leaves it out of its batch (extraction; ``indices`` say which).
"""
from __future__ import annotations

import io
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fastmmt.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, batch_views, loader_spec
from fastmmt.data.dali_ops import decode_pipeline, require_dali, test_pipeline, train_pipeline, view_columns
from fastmmt.data.decoded_cache import DecodedCacheError, DecodedImageCache
from fastmmt.data.loaders import TrainBatch
from fastmmt.data.records import ImageReadError, ImageRecord
from fastmmt.data.sampler import BatchPlanner, PlannedLabels

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND"  # zero-length IEND chunk, followed by its 4-byte CRC
ON_ERROR = ("fail", "skip")


def _looks_complete(data: bytes) -> bool:
    """True for a JPEG or PNG with its signature and end marker (the cheap check)."""
    if data.startswith(_JPEG_SOI):
        return data.rstrip(b"\x00\r\n ")[-2:] == _JPEG_EOI
    if data.startswith(_PNG_SIG):
        return data[-12:-4] == _PNG_IEND
    return False


def _pillow_error(data: bytes) -> str | None:
    """Why Pillow cannot fully decode ``data``, or None when it can."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return f"corrupt, truncated or not an image ({type(exc).__name__}: {exc})"
    return None


class EncodedImages:
    """Encoded bytes of the images, read on demand, validated, optionally kept in memory."""

    def __init__(self, paths: Sequence[str], cache: bool = False) -> None:
        self.paths = list(paths)
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self._decoded: set[int] = set()  # indices Pillow decoded fully once (not JPEG/PNG-shaped)
        self.bad: dict[int, str] = {}  # index -> reason, for every file found unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, i: int) -> bytes:
        try:
            with open(self.paths[i], "rb") as f:
                return f.read()
        except FileNotFoundError:
            self._fail(i, "no such file")
        except OSError as exc:
            self._fail(i, f"cannot open ({exc})")

    def _fail(self, i: int, reason: str):
        self.bad[i] = reason
        raise ImageReadError(self.paths[i], reason)

    def get(self, i: int) -> np.ndarray:
        """The file's bytes as a uint8 array; ImageReadError (naming the path) if unreadable."""
        if i in self.bad:
            raise ImageReadError(self.paths[i], self.bad[i])
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        data = self._read(i)
        if i not in self._decoded and not _looks_complete(data):
            reason = _pillow_error(data)
            if reason is not None:
                self._fail(i, reason)
            self._decoded.add(i)
        arr = np.frombuffer(data, dtype=np.uint8)
        if self._cache is not None:
            self._cache[i] = arr
        return arr

    def confirm(self, i: int) -> str | None:
        """Fully decode image ``i`` with Pillow (the slow check, used when DALI failed): the
        reason it is unreadable, or None."""
        if i not in self.bad:
            try:
                reason = _pillow_error(self._read(i))
            except ImageReadError:
                pass
            else:
                if reason is not None:
                    self.bad[i] = reason
        return self.bad.get(i)


class ErrorPolicy:
    """``on_error`` handling shared by the loaders: raise, or warn once per path and count."""

    def __init__(self, on_error: str) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.skipped = 0
        self._warned: set[str] = set()

    def handle(self, err: ImageReadError) -> None:
        """Raise ``err`` (fail) or record one skipped occurrence (skip)."""
        if self.on_error == "fail":
            raise err
        self.skipped += 1
        if err.path not in self._warned:
            self._warned.add(err.path)
            warnings.warn(f"skipping unreadable image: {err}", RuntimeWarning, stacklevel=4)

    @property
    def bad_paths(self) -> list[str]:
        """Paths skipped so far."""
        return sorted(self._warned)


@dataclass(frozen=True)
class _Feed:
    """One batch as fed to DALI: indices, encoded bytes, extra per-sample columns."""

    indices: np.ndarray
    encoded: list[np.ndarray]
    columns: tuple[np.ndarray, ...] = ()

    def source_tuple(self) -> tuple:
        return (self.encoded, self.indices, *self.columns)


class _PipelineRunner:
    """Runs a pipeline whose ``external_source`` pulls :class:`_Feed` batches from Python.

    A DALI failure leaves the pipeline unusable: the runner asks ``repair`` to fix the batches
    that were in flight (or raise), builds a fresh pipeline and feeds them again. An epoch left
    early (or an error) discards the pipeline, so no stale batch leaks into the next epoch.
    """

    def __init__(self, make: Callable[[Callable[[], tuple]], object],
                 repair: Callable[[list[_Feed], Exception], list[_Feed]]) -> None:
        self._make, self._repair = make, repair
        self._pipe = None
        self._feeds: Iterator[_Feed] = iter(())
        self._queue: deque[_Feed] = deque()
        self._inflight: deque[_Feed] = deque()

    def _source(self) -> tuple:
        feed = self._queue.popleft() if self._queue else next(self._feeds)  # StopIteration ends
        self._inflight.append(feed)
        return feed.source_tuple()

    def run(self, feeds: Iterable[_Feed]) -> Iterator[tuple[_Feed, tuple]]:
        """Yield ``(feed, pipeline outputs)`` for every feed, in order."""
        self._feeds, self._queue, self._inflight = iter(feeds), deque(), deque()
        if self._pipe is None:
            self._pipe = self._make(self._source)
            self._pipe.build()
        finished = False
        try:
            while True:
                try:
                    outs = self._pipe.run()
                except StopIteration:
                    break
                except RuntimeError as err:  # a DALI operator failed on an in-flight batch
                    fixed = self._repair(list(self._inflight), err)
                    self._queue.extendleft(reversed(fixed))
                    self._inflight.clear()
                    self._pipe = self._make(self._source)
                    self._pipe.build()
                    continue
                yield self._inflight.popleft(), outs
            self._pipe.reset()
            finished = True
        finally:
            if not finished:
                self._pipe = None


def _copy_stream(device: torch.device):
    """The stream a DALI -> torch copy to ``device`` runs on: torch's current stream on CUDA
    (where the destination was allocated and its consumers run), None (a host copy) on CPU."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _to_torch(tensor_list, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Copy a dense DALI TensorList into a new torch tensor on ``device`` (NCHW view)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    # On torch's current stream, as DALI's own iterator does: ordered after the allocation and
    # before every later kernel that reads ``out``, with no host sync (DALI makes the stream
    # wait for its output to be ready).
    feed_ndarray(dense, out, cuda_stream=_copy_stream(out.device))
    return out.permute(0, 3, 1, 2) if channels_last else out


def dali_decoder(device: str | None = None) -> str:
    """The decoder a DALI loader on ``device`` uses, as a decoded-image cache names it."""
    return f"dali-{_resolve_device(device)}"


def _resolve_device(device: str | None) -> str:
    if device is None:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device='gpu' requested but CUDA is not available")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be None, 'cpu' or 'gpu', got {device!r}")
    return device


class _DaliLoaderBase:
    """Device choice, the bytes store, the decoded-image cache, the error policy and the
    pipeline runner.

    With a ``decoded_cache`` (made for this loader's decoder, :func:`dali_decoder`), the first
    pass decodes every image not yet stored once, with the same DALI decoder as the graphs
    (:func:`~fastmmt.data.dali_ops.decode_pipeline`), and the graphs take the decoded images
    from then on: every later pass decodes nothing and its images are unchanged. The cache
    lives in host memory; on a GPU the stored images are copied to the device in the graph.
    """

    def __init__(self, records: Sequence[ImageRecord], workers: int, on_error: str, device: str | None,
                 device_id: int | None, channels_last: bool, cache: bool,
                 decoded_cache: DecodedImageCache | None = None) -> None:
        require_dali()
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.records = list(records)
        if not self.records:
            raise ValueError("no records to load")
        self.device = _resolve_device(device)
        if self.device == "gpu":
            index = torch.cuda.current_device() if device_id is None else device_id
            if not 0 <= index < torch.cuda.device_count():
                raise ValueError(f"device_id {index} but {torch.cuda.device_count()} CUDA device(s) are visible")
            self.torch_device = torch.device("cuda", index)
        else:
            self.torch_device = torch.device("cpu")
        self.workers = max(1, workers)  # DALI threads; 0 (torch: load in-process) means 1
        self.channels_last = channels_last
        self.images = EncodedImages([r.path for r in self.records], cache=cache)
        self.policy = ErrorPolicy(on_error)
        self.pids = np.array([r.pid for r in self.records], dtype=np.int64)
        self.camids = np.array([r.camid for r in self.records], dtype=np.int64)
        self.decoded_cache = decoded_cache
        if decoded_cache is not None:
            decoded_cache.check_decoder(f"dali-{self.device}")
            self._slots = decoded_cache.slots([r.path for r in self.records])

    @property
    def _decoded(self) -> bool:
        return self.decoded_cache is not None

    def _sample(self, i: int) -> np.ndarray:
        """What the graph takes for image ``i``: its file bytes, or its decoded pixels from the
        cache; ImageReadError (naming the path) if it is unreadable."""
        if self.decoded_cache is None:
            return self.images.get(i)
        slot = int(self._slots[i])
        if self.decoded_cache.has(slot):
            return self.decoded_cache.get(slot).numpy()
        self.images.get(i)  # raises for an image found unreadable while filling
        raise RuntimeError(f"image {self.records[i].path!r} is readable but missing from the decoded-image "
                           f"cache (the cache was not filled first)")

    def _fill_decoded(self, batch_size: int) -> None:
        """Decode the images not yet in the decoded-image cache once and store them. Unreadable
        files are left out (recorded in ``images.bad``): a pass meets them as it would without
        the cache, under the same ``on_error`` policy."""
        cache = self.decoded_cache
        if cache is None:
            return
        todo = np.array([i for i in range(len(self.records))
                         if not cache.has(int(self._slots[i])) and i not in self.images.bad], dtype=np.int64)
        if todo.size == 0:
            return

        def make(source: Callable[[], tuple]):
            return decode_pipeline(source, batch_size=batch_size, device=self.device, num_threads=self.workers,
                                   device_id=self._device_id, prefetch=2)

        def feed(indices: np.ndarray) -> _Feed | None:  # unreadable files are left out (recorded bad)
            return self._files_feed(indices, self.images.get, lambda err: None)

        chunks = (feed(todo[s:s + batch_size]) for s in range(0, len(todo), batch_size))
        for _, outs in _PipelineRunner(make, self._refeed(feed)).run(f for f in chunks if f is not None):
            images = outs[1].as_cpu() if self.device == "gpu" else outs[1]
            for k, i in enumerate(np.array(outs[0].as_tensor(), dtype=np.int64).tolist()):
                if not cache.put(int(self._slots[i]), np.array(images.at(k))):
                    raise DecodedCacheError(f"image {self.records[i].path!r} decodes to {np.array(images.at(k)).shape}, "
                                            f"not the size its header announces: turn the decoded-image cache off")

    @staticmethod
    def _files_feed(indices: np.ndarray, read: Callable[[int], np.ndarray],
                    unreadable: Callable[[ImageReadError], None]) -> _Feed | None:
        """The feed of the images among ``indices`` that ``read`` reads; ``unreadable`` decides
        about each other one (ignore it, or apply the ``on_error`` policy); None when none is left."""
        keep, encoded = [], []
        for i in indices.tolist():
            try:
                encoded.append(read(i))
                keep.append(i)
            except ImageReadError as err:
                unreadable(err)
        return _Feed(np.array(keep, dtype=np.int64), encoded) if keep else None

    def _refeed(self, feed: Callable[[np.ndarray], _Feed | None]) -> Callable[[list[_Feed], Exception], list[_Feed]]:
        """A pipeline runner's ``repair``: name the unreadable files of the failed batches, then
        build those batches again with ``feed`` (which leaves them out)."""
        def repair(feeds: list[_Feed], err: Exception) -> list[_Feed]:
            self._dali_error(feeds, err)
            return [f for f in (feed(f.indices) for f in feeds) if f is not None]
        return repair

    @property
    def skipped(self) -> int:
        """How many times an unreadable image was substituted or left out (on_error='skip')."""
        return self.policy.skipped

    @property
    def _device_id(self) -> int | None:
        return self.torch_device.index if self.device == "gpu" else None

    def _dali_error(self, feeds: list[_Feed], err: Exception) -> list[int]:
        """Map a DALI failure back to file paths: the unreadable indices among ``feeds``."""
        bad = [int(i) for f in feeds for i in f.indices if self.images.confirm(int(i)) is not None]
        if not bad:
            paths = [self.records[int(i)].path for f in feeds for i in f.indices]
            raise RuntimeError(f"DALI failed on a batch whose files Pillow decodes: {paths}") from err
        return bad


class DaliTrainLoader(_DaliLoaderBase, PlannedLabels):
    """P x K training batches from DALI; the interface of :class:`TorchTrainLoader`.

    The same :class:`~fastmmt.data.sampler.BatchPlanner` plan as the torch loader (identical
    indices and augmentation seeds for the same seed, epoch and rank) and the same view draws
    (:func:`~fastmmt.data.augment.image_views`), ``num_views`` per image (decoded once). With
    ``world_size > 1`` (one loader per rank) the pipeline reads and decodes only this ``rank``'s
    share of each global batch, on CUDA device ``device_id`` (default: the current one).
    Labels are read at the start of each :meth:`epoch`; :meth:`set_labels` swaps them without
    rebuilding the pipeline. Outputs are float32 NCHW tensors on the training device
    (``channels_last=True``: the same shape, channels-last memory).
    """

    def __init__(self, records: Sequence[ImageRecord], labels: np.ndarray, height: int, width: int,
                 batch_size: int = 64, num_instances: int = 4, num_views: int = 1, workers: int = 2,
                 seed: int = 0, erase: bool = True, rank: int = 0, world_size: int = 1, *,
                 augment: AugmentSpec | None = None, on_error: str = "fail", device: str | None = None,
                 device_id: int | None = None, channels_last: bool = False, cache: bool = False,
                 prefetch: int = 2, decoded_cache: DecodedImageCache | None = None) -> None:
        super().__init__(records, workers, on_error, device, device_id, channels_last, cache, decoded_cache)
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.spec = loader_spec(height, width, erase, augment)
        self.planner = BatchPlanner(labels, self.camids, batch_size, num_instances, seed, rank, world_size)
        self.num_views, self.seed = num_views, seed
        self._runner = _PipelineRunner(self._make_pipeline, self._repair)
        self._prefetch = prefetch

    def _make_pipeline(self, source: Callable[[], tuple]):
        return train_pipeline(source, batch_size=self.planner.share_size, spec=self.spec,
                              num_views=self.num_views, device=self.device, num_threads=self.workers,
                              device_id=self._device_id, channels_last=self.channels_last,
                              prefetch=self._prefetch, decoded=self._decoded)

    def _substitute(self, indices: np.ndarray, pos: int, rng: np.random.Generator) -> int:
        """A readable image with the label of ``indices[pos]``: one of the batch first, then any."""
        label = self.labels[indices[pos]]
        same = [int(i) for i in indices if self.labels[i] == label and int(i) not in self.images.bad]
        pool = np.flatnonzero(self.labels == label)
        for cand in same + [int(i) for i in rng.permutation(pool)]:
            try:
                self.images.get(cand)
                return cand
            except ImageReadError:
                continue
        path = self.records[int(indices[pos])].path
        raise ImageReadError(path, f"unreadable, and no readable image of label {label} to substitute")

    def _encode(self, indices: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
        """Read every image of the batch, substituting unreadable ones by the policy."""
        indices = indices.copy()
        encoded: list[np.ndarray] = []
        for pos in range(len(indices)):
            while True:
                try:
                    encoded.append(self._sample(int(indices[pos])))
                    break
                except ImageReadError as err:
                    self.policy.handle(err)
                    indices[pos] = self._substitute(indices, pos, rng)
        return indices, encoded

    def _feed(self, indices: np.ndarray, seeds: np.ndarray, rng: np.random.Generator) -> _Feed:
        """A batch's feed: its files and the view columns drawn from the images' seeds (an image
        substituted for an unreadable one gets the seed of the position it fills)."""
        indices, encoded = self._encode(indices, rng)
        columns: list[np.ndarray] = []
        for params in batch_views(self.spec, seeds.tolist(), self.num_views):
            columns.extend(view_columns(params, self.spec.pad))
        return _Feed(indices, encoded, tuple(columns))

    def _repair(self, feeds: list[_Feed], err: Exception) -> list[_Feed]:
        bad = set(self._dali_error(feeds, err))
        rng = np.random.default_rng([self.seed, len(self.images.bad)])
        fixed = []
        for f in feeds:
            if bad.intersection(f.indices.tolist()):
                indices, encoded = self._encode(f.indices, rng)
                f = _Feed(indices, encoded, f.columns)
            fixed.append(f)
        return fixed

    def epoch(self, epoch: int, iters: int) -> Iterator[TrainBatch]:
        """Exactly ``iters`` batches for ``epoch`` (labels are read when the call starts)."""
        plan = self.planner.plan(epoch, iters)
        if iters == 0:
            return
        self._fill_decoded(self.planner.share_size)
        labels = torch.from_numpy(self.labels.copy())
        camids = torch.from_numpy(self.camids)
        rng = np.random.default_rng([self.seed, epoch, self.planner.rank])  # substitutes only
        feeds = (self._feed(idx, seeds, rng) for idx, seeds in zip(plan.indices, plan.seeds))
        for _, outs in self._runner.run(feeds):
            indices = torch.from_numpy(np.array(outs[0].as_tensor(), dtype=np.int64))
            views = tuple(_to_torch(o, self.torch_device, self.channels_last) for o in outs[1:])
            yield TrainBatch(views, labels[indices], camids[indices], indices)


class DaliTestLoader(_DaliLoaderBase):
    """Batches ``(images, pids, camids, indices)`` in record order, last partial batch included;
    the interface of :func:`~fastmmt.data.build_test_loader` (iterable any number of times)."""

    def __init__(self, records: Sequence[ImageRecord], height: int, width: int, batch_size: int = 128,
                 workers: int = 2, *, on_error: str = "fail", device: str | None = None,
                 device_id: int | None = None, channels_last: bool = False, cache: bool = False,
                 prefetch: int = 2, decoded_cache: DecodedImageCache | None = None) -> None:
        super().__init__(records, workers, on_error, device, device_id, channels_last, cache, decoded_cache)
        if height <= 0 or width <= 0 or batch_size <= 0:
            raise ValueError(f"need positive height, width and batch_size, got {height}, {width}, "
                             f"{batch_size}")
        self.height, self.width, self.batch_size = height, width, batch_size
        self._prefetch = prefetch
        self._runner = _PipelineRunner(self._make_pipeline, self._refeed(self._feed))

    def _make_pipeline(self, source: Callable[[], tuple]):
        return test_pipeline(source, batch_size=self.batch_size, height=self.height, width=self.width,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD, device=self.device,
                             num_threads=self.workers, device_id=self._device_id,
                             channels_last=self.channels_last, prefetch=self._prefetch,
                             decoded=self._decoded)

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch_size)

    def _feed(self, indices: np.ndarray) -> _Feed | None:
        """The batch's readable images; each unreadable one goes through the ``on_error`` policy."""
        return self._files_feed(indices, self._sample, self.policy.handle)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._fill_decoded(self.batch_size)
        order = np.arange(len(self.records), dtype=np.int64)
        chunks = (self._feed(order[s:s + self.batch_size]) for s in range(0, len(order), self.batch_size))
        pids, camids = torch.from_numpy(self.pids), torch.from_numpy(self.camids)
        for _, outs in self._runner.run(f for f in chunks if f is not None):
            indices = torch.from_numpy(np.array(outs[0].as_tensor(), dtype=np.int64))
            images = _to_torch(outs[1], self.torch_device, self.channels_last)
            yield images, pids[indices], camids[indices], indices
