"""A run's feature extraction, set up once: the extraction loaders of the target training images,
the query and the gallery (with their worker processes or DALI pipelines), and the decoded-image
cache those images share with the training loader.

``data.persistent_loaders`` keeps the loaders for the whole run (False: a new loader for every
extraction, the old way); ``data.decode_cache`` decodes every target image once for the run
(False: on every pass), bounded by ``data.decode_cache_mb``. Either way the features, the
batches and so the numbers are the same; only the time changes.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fastmmt.data import ImageRecord, ReIDDataset
from fastmmt.data.decoded_cache import DecodedCacheError, DecodedImageCache
from fastmmt.data.factory import build_decoded_cache, build_test_loader
from fastmmt.evaluation import FeatureExtractor, evaluate_features
from fastmmt.train.batches import data_device_id
from fastmmt.train.update import NonFiniteLossError
from fastmmt.train.distributed import DistContext, gather_rows, shard_range
from fastmmt.train.options import DataOptions, ModelOptions, RunOptions
from fastmmt.train.runtime import amp_dtype

def make_decoded_cache(dataset: ReIDDataset, dopts: DataOptions, splits: Sequence[str] = ("train", "query", "gallery")
                       ) -> DecodedImageCache | None:
    """The run's decoded-image cache over the images of ``splits`` (None when
    ``data.decode_cache`` is off); its bound is ``data.decode_cache_mb`` (None: half the
    available memory), and a set that does not fit fails here, before any training."""
    if not dopts.decode_cache:
        return None
    seen: dict[str, ImageRecord] = {}
    for split in splits:
        for r in getattr(dataset, split):
            seen.setdefault(r.path, r)
    bound = None if dopts.decode_cache_mb is None else int(dopts.decode_cache_mb * 2**20)
    try:
        return build_decoded_cache(list(seen.values()), backend=dopts.backend, max_bytes=bound,
                                   input_size=(dopts.height, dopts.width))
    except DecodedCacheError as err:
        raise DecodedCacheError(f"{err} [the bound: data.decode_cache_mb; off: data.decode_cache=false]") from None


class RunExtraction:
    """Normalised after-BN features of a dataset's splits for any model, loaders built once.

    Distributed: each rank extracts its contiguous shard; the shards are all-gathered in order.
    Features stay on ``device`` (single process).
    """

    def __init__(self, dataset: ReIDDataset, dopts: DataOptions, ropts: RunOptions, mopts: ModelOptions,
                 device: torch.device, ctx: DistContext | None = None,
                 decoded_cache: DecodedImageCache | None = None) -> None:
        self.dataset, self.dopts, self.ropts, self.mopts = dataset, dopts, ropts, mopts
        self.device, self.ctx = device, ctx or DistContext(device=device)
        self.decoded_cache = decoded_cache
        self._extractors: dict[str, FeatureExtractor] = {}

    def _extractor(self, split: str) -> FeatureExtractor:
        if split in self._extractors:
            return self._extractors[split]
        records = getattr(self.dataset, split)
        share = shard_range(len(records), self.ctx)
        d = self.dopts
        loader = build_test_loader(list(records)[share.start:share.stop], d.height, d.width,
                                   batch_size=d.test_batch_size, workers=d.workers, backend=d.backend,
                                   local_rank=data_device_id(self.ctx), decoded_cache=self.decoded_cache,
                                   persistent=d.persistent_loaders)
        ext = FeatureExtractor(loader, self.device, channels_last=self.mopts.channels_last,
                               amp_dtype=amp_dtype(self.ropts.amp),
                               progress=self.ropts.progress and self.ctx.is_main)
        if d.persistent_loaders:
            self._extractors[split] = ext
        return ext

    def features(self, model: nn.Module, split: str = "train", desc: str | None = None) -> torch.Tensor:
        """(N, D) float32 features of ``split`` ("train", "query" or "gallery") in dataset order;
        NaN/inf features raise :class:`NonFiniteLossError` naming ``desc``."""
        return self.features_of([model], split, desc)[0]

    def features_of(self, models: Sequence[nn.Module], split: str = "train", desc: str | None = None
                    ) -> list[torch.Tensor]:
        """:meth:`features` of every model from one pass over the split's images."""
        n = len(getattr(self.dataset, split))
        out = [gather_rows(f, n, self.ctx) for f in self._extractor(split).of(models)]
        for i, feats in enumerate(out):
            bad = (~torch.isfinite(feats)).any(1)
            if bad.any():
                which = f" (model {i + 1} of {len(out)})" if len(out) > 1 else ""
                raise NonFiniteLossError(f"{desc or split}: {int(bad.sum())} of {len(feats)} feature rows are "
                                         f"NaN/inf{which}")
        return out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Target test metrics (mAP, rank-1/5/10) of ``model`` plus the evaluation wall time."""
        t0 = time.perf_counter()
        qf, gf = self.features(model, "query"), self.features(model, "gallery")
        q, g = self.dataset.query, self.dataset.gallery
        r = evaluate_features(qf, gf, np.array([x.pid for x in q]), np.array([x.pid for x in g]),
                              np.array([x.camid for x in q]), np.array([x.camid for x in g]))
        return {"mAP": float(r.mAP), "rank1": float(r.cmc[0]), "rank5": float(r.cmc[4]),
                "rank10": float(r.cmc[9]), "eval_seconds": time.perf_counter() - t0}
