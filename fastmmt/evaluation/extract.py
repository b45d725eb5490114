"""Feature extraction: run a model over a test loader and collect features in dataset order.

Features stay on the model's device (clustering and ranking take them there); only the small
per-image metadata (ids, cameras, dataset indices) is gathered on the CPU. A
:class:`FeatureExtractor` holds one loader for a fixed set of images and is called once per
model and epoch (or once for several models: one pass over the images), so the loader (and its
workers or DALI pipeline) is built once per run.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm


def _batch_parts(batch: object) -> tuple[torch.Tensor, ...]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 4:
        got = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) \
            else type(batch).__name__
        raise ValueError(f"loader must yield (images, pids, camids, indices), got {got}")
    return tuple(torch.as_tensor(x) for x in batch)


def extract_features_of(models: Sequence[nn.Module], loader: Iterable, device: str | torch.device = "cpu",
                        progress: bool = True, channels_last: bool = False, amp_dtype: torch.dtype | None = None
                        ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`extract_features` of several models from ONE pass over ``loader`` (each batch is
    loaded, moved and converted once, then run through every model): a list of features, one
    per model, and the pids and camids."""
    device = torch.device(device)
    models = list(models)
    if not models:
        raise ValueError("extract_features_of needs at least one model")
    feats: list[list[torch.Tensor]] = [[] for _ in models]
    pids, camids, indices = [], [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc="extract", unit="batch", leave=False,
               disable=not progress or not sys.stderr.isatty())
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode(), amp:
            for batch in bar:
                images, pid, camid, index = _batch_parts(batch)
                sizes = (images.shape[0], pid.numel(), camid.numel(), index.numel())
                if len(set(sizes)) != 1:
                    raise ValueError(f"batch sizes disagree: images {sizes[0]}, pids {sizes[1]}, "
                                     f"camids {sizes[2]}, indices {sizes[3]}")
                x = images.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for model, out_list in zip(models, feats):
                    out = model(x)
                    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
                        raise ValueError(f"model must return (batch, D) features in eval mode, got "
                                         f"{getattr(out, 'shape', type(out).__name__)} for {x.shape[0]} images")
                    out_list.append(out.float())
                pids.append(pid.reshape(-1).long().cpu())
                camids.append(camid.reshape(-1).long().cpu())
                indices.append(index.reshape(-1).long().cpu())
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
        bar.close()
    if not indices:
        raise ValueError("loader yielded no batches")
    index = torch.cat(indices)
    order = torch.argsort(index)
    if (index[order][1:] == index[order][:-1]).any():
        dup = index[order][1:][index[order][1:] == index[order][:-1]][:5].tolist()
        raise ValueError(f"loader yielded repeated dataset indices, e.g. {dup}")
    outs = [torch.cat(f) for f in feats]
    return [o[order.to(o.device)] for o in outs], torch.cat(pids)[order], torch.cat(camids)[order]


def extract_features(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
                     progress: bool = True, channels_last: bool = False,
                     amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 on ``device``, pids (N,) and camids (N,) int64 on the CPU, sorted
    by dataset index.

    ``loader`` yields ``(images, pids, camids, indices)`` batches (as
    :func:`fastmmt.data.build_test_loader` does); rows are placed by ``indices`` so any batch
    order gives the same result, and a repeated index is an error. The model runs in eval mode
    (switched for the call and restored after) under ``torch.inference_mode``, on ``device``,
    optionally with channels_last inputs and ``torch.autocast(amp_dtype)``. The features never
    leave ``device``: the loop reads no device value on the host. The tqdm progress bar shows
    only when ``progress`` is true and stderr is a terminal.
    """
    feats, pids, camids = extract_features_of([model], loader, device, progress, channels_last, amp_dtype)
    return feats[0], pids, camids


class FeatureExtractor:
    """Features of one fixed set of images for any model, from a loader built once.

    ``loader`` must be iterable any number of times (a ``DataLoader``, a ``DaliTestLoader``);
    build it once per run and call this object every epoch. ``extractor(model)`` returns the
    (N, D) float32 features on ``device`` in dataset order; the ids and cameras of the last
    call are kept in ``pids`` and ``camids`` (CPU int64).
    """

    def __init__(self, loader: Iterable, device: str | torch.device = "cpu", *, channels_last: bool = False,
                 amp_dtype: torch.dtype | None = None, progress: bool = False) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.channels_last, self.amp_dtype, self.progress = channels_last, amp_dtype, progress
        self.pids: torch.Tensor | None = None
        self.camids: torch.Tensor | None = None

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.of([model])[0]

    def of(self, models: Sequence[nn.Module]) -> list[torch.Tensor]:
        """The features of every model in ``models`` from one pass over the images."""
        feats, self.pids, self.camids = extract_features_of(
            models, self.loader, device=self.device, progress=self.progress,
            channels_last=self.channels_last, amp_dtype=self.amp_dtype)
        return feats
