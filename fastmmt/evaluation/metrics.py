"""Re-ID ranking metrics (mAP and CMC, Market-1501 protocol), vectorised and chunked over queries.

Protocol: rank the gallery by increasing distance; for each query drop the gallery entries with
the same id AND the same camera; a query with no true match left is skipped (not counted).
Identities are only compared for equality: a distractor id (0) is simply a wrong id. Junk
images (id -1) are removed by the dataset loaders, so none should reach here; if present they
count as wrong ids too.

Ties (equal distances) are ranked by gallery index (a stable sort), and AP is rank-based:
``AP = mean over the true matches of (#true matches up to and including it) / (its rank)``.
scikit-learn's ``average_precision_score`` (what the original MMT code reports) instead treats
tied scores as one threshold, so it differs when a true match ties with a wrong one: for a
match and a wrong gallery image at the same distance, fastmmt gives AP 1 when the match has the
lower gallery index and 1/2 otherwise, while sklearn gives 1/2 in both cases. Without ties both
agree exactly. fastmmt reports the rank-based value, consistent with its CMC.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from fastmmt.evaluation.distance import pairwise_sq_euclidean

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]
_INT64_MAX = torch.iinfo(torch.int64).max
_CHUNK_ELEMENTS = 1 << 22  # queries per chunk x gallery size: bounds the working memory (~200 MB)


@dataclass(frozen=True)
class RankMetrics:
    """mAP in [0, 1]; ``cmc[r - 1]`` = rank-r accuracy; ``ranks`` = {r: cmc[r - 1]} for the
    requested ranks; ``num_valid_queries`` = queries with at least one true match."""

    mAP: float
    cmc: np.ndarray
    num_valid_queries: int
    ranks: dict[int, float]

    def __str__(self) -> str:
        cmc = ", ".join(f"R{r} {100 * v:.1f}" for r, v in self.ranks.items())
        return f"mAP {100 * self.mAP:.1f}, {cmc} ({self.num_valid_queries} queries)"


def _labels(x: ArrayLike, name: str, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _ranks_by_sort(dist: torch.Tensor, match: torch.Tensor, keep: torch.Tensor, mmax: int) -> torch.Tensor:
    """1-based ranks (among kept entries) of each row's true matches via a stable full sort."""
    order = torch.sort(dist, dim=1, stable=True).indices
    pos = keep.gather(1, order).cumsum(1)
    masked = torch.where(match.gather(1, order), pos, _INT64_MAX)
    return torch.topk(masked, mmax, dim=1, largest=False, sorted=True).values


def _ranks_by_count(dist: torch.Tensor, match: torch.Tensor, keep: torch.Tensor, mmax: int) -> torch.Tensor:
    """Same ranks as :func:`_ranks_by_sort` without sorting the gallery (float32 or narrower).

    Each distance becomes a unique int64 key ``ordered_bits(d) * G + index``, so key order is
    exactly the stable sort order. Only the (few) true-match keys are sorted; every other kept
    entry is binned by how many match keys are below it, and the rank of the k-th match is
    ``k + #kept wrong entries in bins <= k``.
    """
    b, g = dist.shape
    bits = (dist.to(torch.float32) + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits ^= (bits >> 31) & 0x7FFFFFFF  # IEEE bits -> int32 with the order of the floats
    key = bits.to(torch.int64).mul_(g).add_(torch.arange(g, device=dist.device))
    del bits
    match_keys = torch.topk(torch.where(match, key, _INT64_MAX), mmax, dim=1, largest=False,
                            sorted=True).values
    others = key.masked_fill_(match | ~keep, _INT64_MAX)
    bins = torch.searchsorted(match_keys, others)  # INT64_MAX lands at or after the last match
    counts = torch.zeros(b, mmax + 1, dtype=torch.int64, device=dist.device)
    counts.scatter_add_(1, bins, torch.ones(1, dtype=torch.int64, device=dist.device).expand_as(bins))
    return counts.cumsum(1)[:, :mmax] + torch.arange(1, mmax + 1, device=dist.device)


def _chunk_stats(dist: torch.Tensor, q_pids: torch.Tensor, q_cams: torch.Tensor,
                 g_pids: torch.Tensor, g_cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query of the chunk: AP (float64), rank of the first true match, has-a-match flag."""
    same_id = g_pids.unsqueeze(0) == q_pids.unsqueeze(1)
    keep = ~(same_id & (g_cams.unsqueeze(0) == q_cams.unsqueeze(1)))
    match = same_id & keep
    n_match = match.sum(1)
    valid = n_match > 0
    mmax = int(n_match.max()) if n_match.numel() else 0
    if mmax == 0:
        zero = torch.zeros(dist.shape[0], device=dist.device)
        return zero.double(), zero.long(), valid
    rank_fn = _ranks_by_sort if dist.dtype == torch.float64 else _ranks_by_count
    ranks = rank_fn(dist, match, keep, mmax)
    k = torch.arange(1, mmax + 1, device=dist.device)
    in_row = k.unsqueeze(0) <= n_match.unsqueeze(1)
    precision = torch.where(in_row, k.double() / ranks.double(), 0.0)
    ap = precision.sum(1) / n_match.clamp(min=1)
    return ap, ranks[:, 0], valid


@torch.no_grad()
def _aggregate(dist_rows: Callable[[int, int], torch.Tensor], num_q: int, num_g: int,
               q_pids: torch.Tensor, g_pids: torch.Tensor, q_cams: torch.Tensor, g_cams: torch.Tensor,
               ranks: Sequence[int], chunk_size: int | None) -> RankMetrics:
    ranks = tuple(int(r) for r in ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    length = max(ranks)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(num_g, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = q_pids.device
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros(length + 1, dtype=torch.int64, device=device)
    num_valid = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        dist = dist_rows(start, stop)
        if torch.isnan(dist).any():
            raise ValueError(f"distance matrix has NaN in query rows {start}..{stop - 1}")
        ap, first, valid = _chunk_stats(dist, q_pids[start:stop], q_cams[start:stop], g_pids, g_cams)
        ap_sum += ap[valid].sum()
        num_valid += valid.sum()
        hits += torch.bincount(first[valid].clamp(max=length + 1) - 1, minlength=length + 1)[: length + 1]
    n = int(num_valid)
    if n == 0:
        raise ValueError("no query has a true match in the gallery (different camera, same id): "
                         "check the query/gallery ids and cameras")
    cmc = (hits[:length].cumsum(0).double() / n).cpu().numpy()
    return RankMetrics(mAP=float(ap_sum) / n, cmc=cmc, num_valid_queries=n,
                       ranks={r: float(cmc[r - 1]) for r in ranks})


def rank_metrics(distmat: torch.Tensor | np.ndarray, q_pids: ArrayLike, g_pids: ArrayLike,
                 q_camids: ArrayLike, g_camids: ArrayLike, ranks: Sequence[int] = (1, 5, 10),
                 chunk_size: int | None = None) -> RankMetrics:
    """mAP and CMC of a (Q, G) distance matrix (smaller = more similar), Market-1501 protocol.

    Runs in torch on the device of ``distmat`` (numpy input: CPU), ``chunk_size`` queries at a
    time (default: about 4M distances per chunk) so memory stays bounded at MSMT17 scale.
    float32/16 distances use an exact sort-free ranking; float64 ones a stable sort. See the
    module docstring for ties and how AP differs from scikit-learn's on them.
    """
    dist = torch.from_numpy(np.ascontiguousarray(distmat)) if isinstance(distmat, np.ndarray) else distmat
    if not isinstance(dist, torch.Tensor) or dist.dim() != 2 or not dist.is_floating_point():
        raise ValueError(f"distmat must be a 2-D floating (Q, G) matrix, got "
                         f"{getattr(dist, 'shape', type(dist))} {getattr(dist, 'dtype', '')}")
    nq, ng = dist.shape
    dev = dist.device
    return _aggregate(lambda s, e: dist[s:e], nq, ng,
                      _labels(q_pids, "q_pids", nq, dev), _labels(g_pids, "g_pids", ng, dev),
                      _labels(q_camids, "q_camids", nq, dev), _labels(g_camids, "g_camids", ng, dev),
                      ranks, chunk_size)


def evaluate_features(qf: torch.Tensor, gf: torch.Tensor, q_pids: ArrayLike, g_pids: ArrayLike,
                      q_camids: ArrayLike, g_camids: ArrayLike, ranks: Sequence[int] = (1, 5, 10),
                      chunk_size: int | None = None) -> RankMetrics:
    """:func:`rank_metrics` on squared Euclidean distances of query/gallery features.

    Pass the L2-normalised features a :class:`~fastmmt.models.ReIDNet` returns in eval mode
    (they are not re-normalised here). The (Q, G) matrix is never materialised: distances are
    computed one query chunk at a time on the device of ``qf``.
    """
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D) with the same D, got "
                         f"{tuple(qf.shape)} and {tuple(gf.shape)}")
    nq, ng = qf.shape[0], gf.shape[0]
    dev = qf.device
    gf = gf.to(dev)
    return _aggregate(lambda s, e: pairwise_sq_euclidean(qf[s:e], gf), nq, ng,
                      _labels(q_pids, "q_pids", nq, dev), _labels(g_pids, "g_pids", ng, dev),
                      _labels(q_camids, "q_camids", nq, dev), _labels(g_camids, "g_camids", ng, dev),
                      ranks, chunk_size)
