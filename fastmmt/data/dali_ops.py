"""The DALI graphs of the input pipelines.

Every random choice of the training augmentation (flip, crop offset, erasing box) is drawn in
Python by :func:`fastmmt.data.augment.draw_view`, the function the torch
:class:`~fastmmt.data.TrainTransform` draws with, per image and per view, and fed to the graph
through ``fn.external_source``: the graph itself is deterministic, so its views are those of the
torch pipeline for the same seeds, whatever the number of DALI threads.

The same graph runs on the CPU (``device="cpu"``, ``device_id=None``) or on a GPU
(``device="gpu"``: nvJPEG ``mixed`` decoding, every later op on the GPU).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fastmmt.data.augment import AugmentSpec, ViewParams

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.pipeline import Pipeline
    DALI_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # the torch pipeline stays usable without DALI
    DALI_IMPORT_ERROR = exc

# One training view is fed as these four per-sample arrays (see view_columns).
VIEW_COLUMNS = 4
# DALI 2.4's default dynamic executor segfaulted here (in the CPU image decoder) when a decode
# failed while another iteration was in flight (prefetch 2; 8 of 12 runs); the legacy executor
# recovered in 35 of 35 runs with the same files, so the pipelines use it.
EXEC_DYNAMIC = False


def view_columns(params: ViewParams, pad: int) -> list[np.ndarray]:
    """The graph's :data:`VIEW_COLUMNS` per-sample inputs of one view: mirror flag, slice start,
    erase anchor and erase shape.

    The graph crops, then mirrors; flipping first and cropping at left ``x`` equals cropping the
    unflipped image at ``2*pad - x`` and mirroring, hence the slice start below.
    """
    left = np.where(params.flip == 1, 2 * pad - params.crop[:, 1], params.crop[:, 1])
    start = np.stack([params.crop[:, 0], left], axis=1).astype(np.float32) - pad
    return [params.flip.astype(np.int32), start,
            params.erase_anchor.astype(np.float32), params.erase_shape.astype(np.float32)]


def require_dali() -> None:
    """Raise ImportError with the reason when DALI cannot be imported."""
    if DALI_IMPORT_ERROR is not None:
        raise ImportError(f"NVIDIA DALI is not importable ({DALI_IMPORT_ERROR}); "
                          f"use backend='torch'") from DALI_IMPORT_ERROR


def _check_device(device: str) -> None:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def _decode(encoded, device: str):
    """Decode file bytes to RGB uint8 HWC (grey and RGBA inputs too): nvJPEG ``mixed`` on a GPU."""
    return fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _decode_resize(images, device: str, height: int, width: int, decoded: bool = False):
    """Decode (unless ``decoded``: already RGB uint8 HWC from the decoded-image cache, moved to
    the GPU for ``device="gpu"``) and bicubic-resize to height x width."""
    img = (images.gpu() if device == "gpu" else images) if decoded else _decode(images, device)
    return fn.resize(img, size=(height, width), interp_type=types.INTERP_CUBIC, antialias=True)


def _image_input(decoded: bool) -> tuple:
    """dtype, ndim and layout of the image column of a feed: file bytes, or decoded HWC uint8."""
    return (types.UINT8, 3, "HWC") if decoded else (types.UINT8, 1, "")


def _normalize(img, mean: Sequence[float], std: Sequence[float], channels_last: bool, mirror=None):
    """uint8 HWC -> float32 ``(x/255 - mean)/std``, optionally mirrored, CHW unless channels_last."""
    kwargs = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(img, mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                                    dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                    **kwargs)


def _build(graph: Callable, batch_size: int, num_threads: int, device_id: int | None, prefetch: int,
           device: str) -> "Pipeline":
    """The one ``pipeline_def`` of fastmmt's DALI graphs: asynchronous, pipelined execution with
    ``prefetch`` batches in flight, on ``device_id`` (None: CPU only)."""
    require_dali()
    _check_device(device)
    return pipeline_def(graph, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                        prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True,
                        exec_dynamic=EXEC_DYNAMIC)()


def train_pipeline(source: Callable[[], tuple], *, batch_size: int, spec: AugmentSpec, num_views: int,
                   device: str = "cpu", num_threads: int = 2, device_id: int | None = None,
                   channels_last: bool = False, prefetch: int = 2, decoded: bool = False) -> "Pipeline":
    """The training graph of ``spec``: decode once, then ``num_views`` independent augmented branches.

    ``source()`` returns one batch as ``(encoded, indices, *view columns)``: encoded file bytes
    (uint8 1-D arrays; with ``decoded``, the images already decoded, uint8 HWC), int64 indices
    (passed through to keep outputs aligned with the feed) and :data:`VIEW_COLUMNS` per-sample
    arrays per view (:func:`view_columns`); it raises
    StopIteration at the end of an epoch. Outputs: ``(indices, view_0, ..., view_{V-1})``.
    Per view: centred zero pad + crop in one ``fn.slice`` (out-of-bounds = 0), mirror and
    normalise in ``fn.crop_mirror_normalize``, then ``fn.erase`` with ``spec.erase_fill`` written
    into the normalised tensor (an empty box erases nothing).
    """
    layout_axes = "HW"
    height, width = spec.height, spec.width
    crop_shape = np.array([height, width], dtype=np.float32)

    def graph():
        n_out = 2 + VIEW_COLUMNS * num_views
        img_type, img_ndim, img_layout = _image_input(decoded)
        dtypes = [img_type, types.INT64] + [types.INT32, types.FLOAT, types.FLOAT, types.FLOAT] * num_views
        ndims = [img_ndim, 0] + [0, 1, 1, 1] * num_views
        layouts = [img_layout] + [""] * (n_out - 1)
        feeds = fn.external_source(source=source, num_outputs=n_out, batch=True, dtype=dtypes, ndim=ndims,
                                   layout=layouts)
        encoded, indices = feeds[0], feeds[1]
        img = _decode_resize(encoded, device, height, width, decoded)
        views = []
        for v in range(num_views):
            flip, start, e_anchor, e_shape = feeds[2 + VIEW_COLUMNS * v: 2 + VIEW_COLUMNS * (v + 1)]
            x = fn.slice(img, start, crop_shape, axes=(0, 1), normalized_anchor=False,
                         normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
            x = _normalize(x, spec.mean, spec.std, channels_last, mirror=flip)
            x = fn.erase(x, anchor=e_anchor, shape=e_shape, axis_names=layout_axes,
                         fill_value=list(spec.erase_fill))
            views.append(x)
        return (indices, *views)

    return _build(graph, batch_size, num_threads, device_id, prefetch, device)


def test_pipeline(source: Callable[[], tuple], *, batch_size: int, height: int, width: int,
                  mean: Sequence[float], std: Sequence[float], device: str = "cpu",
                  num_threads: int = 2, device_id: int | None = None, channels_last: bool = False,
                  prefetch: int = 2, decoded: bool = False) -> "Pipeline":
    """The extraction graph: decode, bicubic resize, normalise. ``source()`` returns
    ``(encoded, indices)`` per batch (any size up to ``batch_size``; ``decoded``: images already
    decoded, uint8 HWC); outputs ``(indices, images)``."""
    def graph():
        img_type, img_ndim, img_layout = _image_input(decoded)
        encoded, indices = fn.external_source(source=source, num_outputs=2, batch=True,
                                              dtype=[img_type, types.INT64], ndim=[img_ndim, 0],
                                              layout=[img_layout, ""])
        img = _decode_resize(encoded, device, height, width, decoded)
        return indices, _normalize(img, mean, std, channels_last)

    return _build(graph, batch_size, num_threads, device_id, prefetch, device)


def decode_pipeline(source: Callable[[], tuple], *, batch_size: int, device: str = "cpu",
                    num_threads: int = 2, device_id: int | None = None, prefetch: int = 2) -> "Pipeline":
    """The decoded-image cache's filling graph: the same decoder as the other graphs, nothing
    else. ``source()`` returns ``(encoded, indices)``; outputs ``(indices, images)``, RGB uint8
    HWC at the stored size (on the GPU for ``device="gpu"``)."""
    def graph():
        encoded, indices = fn.external_source(source=source, num_outputs=2, batch=True,
                                              dtype=[types.UINT8, types.INT64], ndim=[1, 0])
        return indices, _decode(encoded, device)

    return _build(graph, batch_size, num_threads, device_id, prefetch, device)
