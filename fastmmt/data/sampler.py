"""The P x K plan: the identity sampler (runs of K images per identity, cross-camera positives
first) and the batch planner both training loaders consume (which images, with which
augmentation seeds, each rank's share of every global batch holds)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch


class IdentitySampler(torch.utils.data.Sampler[int]):
    """Yields dataset indices in runs of ``num_instances`` (K) images of one identity.

    Per pass: identities (pid >= 0; negative pids such as DBSCAN outliers are excluded) in random
    order; per identity one random anchor, then K-1 images drawn from the identity's images on
    OTHER cameras when it has any (without replacement when there are at least K of them, with
    replacement otherwise: the official MMT sampler's threshold, so an identity with exactly K-1
    candidates may repeat one); with no other camera, from its other images on the anchor's
    camera (same rule); a singleton identity repeats its only image (the official sampler yields
    it once, which shifts every later batch off the P x K grid). Every identity yields exactly K
    indices, so consecutive chunks of ``P*K`` indices are P x K batches.

    Deterministic: pass ``r`` of epoch ``e`` uses ``numpy.random.default_rng([seed, e, r])``;
    every ``iter()`` starts the next pass, and :meth:`set_epoch` resets the pass counter.
    """

    def __init__(self, pids: Sequence[int], camids: Sequence[int], num_instances: int = 4,
                 seed: int = 0) -> None:
        pids_a, cams_a = np.asarray(pids, dtype=np.int64), np.asarray(camids, dtype=np.int64)
        if pids_a.ndim != 1 or pids_a.shape != cams_a.shape:
            raise ValueError(f"pids and camids must be 1-D of equal length, got shapes "
                             f"{pids_a.shape} and {cams_a.shape}")
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        groups: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids_a.tolist()):
            if pid >= 0:
                groups[pid].append(i)
        if not groups:
            raise ValueError(f"no identity with pid >= 0 among {len(pids_a)} samples")
        self.identities = sorted(groups)
        self._members = [np.asarray(groups[p], dtype=np.int64) for p in self.identities]
        self._cams = [cams_a[m] for m in self._members]
        self.num_instances, self.seed = num_instances, seed
        self.epoch, self._pass = 0, 0

    @property
    def num_identities(self) -> int:
        """Number of identities (pid >= 0) sampled per pass."""
        return len(self.identities)

    def __len__(self) -> int:
        return self.num_identities * self.num_instances

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose passes the next iterations produce."""
        self.epoch, self._pass = epoch, 0

    def order(self, epoch: int, pass_index: int = 0) -> np.ndarray:
        """The indices of pass ``pass_index`` of ``epoch`` (a pure function of the seed)."""
        rng = np.random.default_rng([self.seed, epoch, pass_index])
        k = self.num_instances
        out = np.empty((self.num_identities, k), dtype=np.int64)
        for row, ident in enumerate(rng.permutation(self.num_identities)):
            members, cams = self._members[ident], self._cams[ident]
            a = int(rng.integers(len(members)))
            out[row, 0] = members[a]
            if k == 1:
                continue
            others = np.flatnonzero(cams != cams[a])
            if others.size == 0:
                others = np.delete(np.arange(len(members)), a)
            if others.size == 0:
                out[row, 1:] = members[a]
                continue
            pick = rng.choice(others, size=k - 1, replace=others.size < k)
            out[row, 1:] = members[pick]
        return out.reshape(-1)

    def __iter__(self) -> Iterator[int]:
        idx = self.order(self.epoch, self._pass)
        self._pass += 1
        return iter(idx.tolist())


def rank_share(batch_size: int, num_instances: int, rank: int, world_size: int) -> slice:
    """Positions of ``rank``'s share of a P x K batch laid out as P runs of K images.

    Each rank gets P / world_size whole identities, contiguous and disjoint across ranks, so the
    ranks' shares put back in rank order are the single-process batch (and rank r's share is
    chunk r of that batch, what ``run.bn_split = batch_size / world_size`` normalises together).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    if batch_size % num_instances or (batch_size // num_instances) % world_size:
        raise ValueError(f"a batch of {batch_size} = {batch_size // num_instances} identities x "
                         f"{num_instances} cannot be split into whole identities over {world_size} ranks")
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


class BatchPlan(NamedTuple):
    """``iters`` batches: ``indices[i, j]`` is the j-th image of batch i, ``seeds[i, j]`` the seed
    its augmented views are drawn from (:func:`fastmmt.data.augment.image_views`); (iters, n) int64."""

    indices: np.ndarray
    seeds: np.ndarray


class BatchPlanner:
    """The P x K plan of a training loader: every global batch of an epoch and this rank's share.

    Owns the labels (``-1`` excludes an image), the cameras, K (``num_instances``), the global
    ``batch_size`` = P*K, the seed, and the rank's place in the run. An epoch's stream is
    :class:`IdentitySampler` passes (pass r of epoch e is a pure function of (seed, e, r)), each
    cut to whole batches: a pass's remainder shorter than a batch is dropped and the sampler
    restarts (the reference's IterLoader + drop_last). Every image of the stream gets an
    augmentation seed, a pure function of (seed, epoch, position in the stream). Rank ``r`` of
    ``world_size`` takes :func:`rank_share` of each global batch: P / world_size whole identities,
    disjoint across ranks, so its indices AND augmentations are those of the single-process
    batch, whichever loader (torch or DALI) consumes the plan.
    """

    def __init__(self, labels: Sequence[int], camids: Sequence[int], batch_size: int = 64,
                 num_instances: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or num_instances <= 0 or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                             f"num_instances ({num_instances})")
        self.camids = np.asarray(camids, dtype=np.int64)
        if self.camids.ndim != 1:
            raise ValueError(f"camids must be 1-D, got shape {self.camids.shape}")
        self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
        self.rank, self.world_size = rank, world_size
        self.share = rank_share(batch_size, num_instances, rank, world_size)
        self.set_labels(labels)

    @property
    def share_size(self) -> int:
        """Images per batch on this rank (``batch_size / world_size``)."""
        return self.share.stop - self.share.start

    def set_labels(self, labels: Sequence[int]) -> None:
        """Replace the labels (e.g. new pseudo-labels each epoch); -1 marks excluded images."""
        lab = np.asarray(labels, dtype=np.int64)
        if lab.shape != self.camids.shape:
            raise ValueError(f"labels must have shape {self.camids.shape} (one per record), got {lab.shape}")
        sampler = IdentitySampler(lab, self.camids, self.num_instances, self.seed)
        if len(sampler) < self.batch_size:
            raise ValueError(f"only {sampler.num_identities} labelled identities: a batch of "
                             f"{self.batch_size} needs at least {self.batch_size // self.num_instances}")
        self.labels, self.sampler = lab, sampler

    def global_plan(self, epoch: int, iters: int) -> BatchPlan:
        """The ``iters`` global batches of ``epoch``, (iters, batch_size) each."""
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        per_pass = len(self.sampler) // self.batch_size
        passes = [self.sampler.order(epoch, r)[:per_pass * self.batch_size] for r in range(-(-iters // per_pass))]
        stream = np.concatenate(passes)[:iters * self.batch_size] if passes else np.empty(0, np.int64)
        seeds = np.random.SeedSequence([self.seed, epoch]).generate_state(stream.size, np.uint64)
        seeds = (seeds >> np.uint64(1)).astype(np.int64)  # torch seeds must fit int64
        return BatchPlan(stream.reshape(iters, self.batch_size), seeds.reshape(iters, self.batch_size))

    def plan(self, epoch: int, iters: int) -> BatchPlan:
        """This rank's share of the ``iters`` global batches of ``epoch``, (iters, share_size)."""
        full = self.global_plan(epoch, iters)
        return BatchPlan(full.indices[:, self.share], full.seeds[:, self.share])


class PlannedLabels:
    """The label interface both training loaders share, kept by their :class:`BatchPlanner`."""

    planner: BatchPlanner

    @property
    def labels(self) -> np.ndarray:
        """The current labels (one per record, -1 = excluded)."""
        return self.planner.labels

    def set_labels(self, labels: np.ndarray) -> None:
        """Replace the labels (e.g. new pseudo-labels each epoch); -1 marks excluded images."""
        self.planner.set_labels(labels)
