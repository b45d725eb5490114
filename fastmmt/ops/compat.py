"""Drop-in loss modules for MMT-derived re-ID code: the official constructors, calls and returns.

Code written against MMT's loss modules (and the SpCL / OpenUnReID-style code descending from
them) switches by changing one import line::

    from fastmmt.ops.compat import CrossEntropyLabelSmooth, SoftEntropy, SoftTripletLoss, TripletLoss

Each class takes one extra keyword, ``backend`` (``"auto"`` | ``"torch"`` | ``"triton"``, see
:mod:`fastmmt.ops`). The Triton backend runs each triplet call as one fused kernel (margins and the
``prec`` ranking fraction computed in the same pass, features L2-normalised just before it); the
torch backend mines on a distance matrix computed without gradient, back-propagates only the 2
mined distances per row (one (N x N) @ (N x D) product) and shares that mining between calls on
the same batch (below).
Neither backend moves tensors between devices or reads a value on the host: ``prec`` is a tensor.

Conventions where fastmmt is stricter than the official code (docs/fused_ops.md, "Switching
MMT/SpCL-style code to fastmmt"):

- ties in batch-hard mining go to the lowest column index (the official sort leaves them unspecified);
- the self-distance is exactly ``sqrt(1e-12)`` with zero gradient (the official matrix carries
  rounding noise there);
- a row without a negative (one identity in the batch) adds 0 to every triplet loss and still
  counts in the mean; ``prec`` counts it as ranked (its ``d_an`` is +inf).

Shared mining (torch backend): MMT evaluates a hard and a soft triplet term on the same student
features with two module instances. The first call's mining of that exact tensor object is kept
(by weak reference, so neither the features nor their graph are kept alive) and reused while the
tensor and its labels are the same objects with unchanged version counters, data pointers and
shapes, and the same ``normalize_feature``. A mining holds no gradient, so each call still builds
its own graph: backward on one loss never frees what another needs.
"""
from __future__ import annotations

import weakref
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastmmt.ops import reference as ref
from fastmmt.ops._dispatch import resolve_backend
from fastmmt.ops.losses import triton_ops

__all__ = ["CrossEntropyLabelSmooth", "SoftEntropy", "SoftTripletLoss", "TripletLoss", "clear_mining_cache"]



# ---- shared batch-hard mining (torch backend) ---------------------------------------------------
class _Mined(NamedTuple):
    """A batch-hard mining and the mined distances' values (no gradient)."""

    mining: ref.Mining
    d_ap: torch.Tensor
    d_an: torch.Tensor


class _MiningCache:
    """The minings of the last few (features, labels) tensor pairs, matched by object identity."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: list[tuple[tuple, weakref.ref, weakref.ref, _Mined]] = []

    @staticmethod
    def _state(x: torch.Tensor, labels: torch.Tensor, normalize: bool) -> tuple:
        return (x._version, x.data_ptr(), x.shape, x.stride(), x.dtype, labels._version, labels.data_ptr(),
                labels.shape, normalize)

    def mining(self, x: torch.Tensor, labels: torch.Tensor, normalize: bool,
               mine: Callable[[], _Mined]) -> _Mined:
        """The cached mining of (``x``, ``labels``, ``normalize``), else ``mine()`` (then cached)."""
        if x.is_inference() or labels.is_inference():  # no version counter: cannot prove unchanged
            return mine()
        state = self._state(x, labels, normalize)
        self._entries = [e for e in self._entries if e[1]() is not None and e[2]() is not None]
        for st, x_ref, lab_ref, m in self._entries:
            if x_ref() is x and lab_ref() is labels and st == state:
                return m
        m = mine()
        self._entries.append((state, weakref.ref(x), weakref.ref(labels), m))
        del self._entries[:-self.size]
        return m

    def clear(self) -> None:
        self._entries = []


_MINING_CACHE = _MiningCache()


def clear_mining_cache() -> None:
    """Forget every shared mining (they are also dropped when their tensors are freed)."""
    _MINING_CACHE.clear()


def _mine(x: torch.Tensor, labels: torch.Tensor) -> _Mined:
    with torch.no_grad():
        dist = ref.pairwise_euclidean(x.detach())
        m = ref.batch_hard_mining(dist, labels)
        return _Mined(m, dist.gather(1, m.ap_idx[:, None])[:, 0], dist.gather(1, m.an_idx[:, None])[:, 0])


class _MinedDistances(torch.autograd.Function):
    """(d_ap, d_an) with the values mining already computed and the gradient of the spec's distance:
    ``d(d_ik)/dx_i = (x_i - x_k) / d_ik = -d(d_ik)/dx_k``, 0 on the diagonal and where the clamp is
    active. The backward is ``dL/dx_i = sum_k W_ik (x_i - x_k)`` with ``W = C + C^T``, C holding the
    2 mined pairs' coefficients per row: one (N x N) @ (N x D) product, the cost of one matrix
    product instead of the three of back-propagating through a distance matrix."""

    @staticmethod
    def forward(ctx, x, d_ap, d_an, ap, an):
        ctx.save_for_backward(x, d_ap, d_an, ap, an)
        return d_ap.clone(), d_an.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ap, g_an):
        x, d_ap, d_an, ap, an = ctx.saved_tensors
        xs = x.to(d_ap.dtype)
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        floor = torch.tensor(ref.EPS_SQ, dtype=d_ap.dtype).sqrt()
        coef = torch.zeros((n, n), dtype=d_ap.dtype, device=x.device)
        for g, d, idx in ((g_ap, d_ap, ap), (g_an, d_an, an)):
            live = (d > floor) & (idx != rows)  # the clamp's and the diagonal's gradient is 0
            coef.index_put_((rows, idx), torch.where(live, g / d, torch.zeros_like(d)), accumulate=True)
        w = coef + coef.t()
        grad = w.sum(1, keepdim=True) * xs - w @ xs
        return grad.to(x.dtype), None, None, None, None


def _mined_distances(emb: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, normalize: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, ref.Mining]:
    """(d_ap, d_an, mining) of the (possibly normalised) features ``x`` of the caller's ``emb``."""
    mined = _MINING_CACHE.mining(emb, labels, normalize, lambda: _mine(x, labels))
    m = mined.mining
    d_ap, d_an = _MinedDistances.apply(x, mined.d_ap, mined.d_an, m.ap_idx, m.an_idx)
    return d_ap, d_an, m


def _ranked_fraction(d_ap: torch.Tensor, d_an: torch.Tensor, has_neg: torch.Tensor) -> torch.Tensor:
    return ((d_an > d_ap) | ~has_neg).to(d_ap.dtype).mean().detach()


def _softmax_triplet(z: torch.Tensor, w: torch.Tensor | float, has_neg: torch.Tensor) -> torch.Tensor:
    """``mean(-w log p_ap - (1 - w) log p_an)``, ``p = softmax(d_ap, d_an)``, ``z = d_ap - d_an``."""
    per_row = w * F.softplus(-z) + (1.0 - w) * F.softplus(z)
    return torch.where(has_neg, per_row, torch.zeros_like(per_row)).mean()


# ---- input checks (shapes only: no host sync) --------------------------------------------------
def _check_features(name: str, emb: torch.Tensor) -> None:
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (batch x dim) tensor, got shape {tuple(emb.shape)}")


def _check_batch_labels(label: torch.Tensor, n: int, name: str = "label") -> None:
    if not isinstance(label, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(label).__name__}")
    if label.dim() != 1 or label.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match {n} input rows, got {tuple(label.shape)}")


def _normalized(emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(emb) if normalize else emb


# ---- the four modules ---------------------------------------------------------------------------
class CrossEntropyLabelSmooth(nn.Module):
    """Label-smoothed cross-entropy, targets ``(1 - epsilon) onehot + epsilon / num_classes``.

    ``forward(inputs, targets)``: ``inputs`` (N x K) logits, ``targets`` (N,) int64 class ids;
    returns ``mean_i sum_c -target_ic log_softmax(inputs)_ic``. A target outside [0, K) raises on the
    torch backend and gives a NaN loss on the Triton backend (no host-side check).
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1, backend: str = "auto") -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be a positive count, got {num_classes}")
        resolve_backend(backend)
        self.num_classes, self.epsilon, self.backend = int(num_classes), float(epsilon), backend

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_features("inputs", inputs)
        _check_batch_labels(targets, inputs.shape[0], "targets")
        if resolve_backend(self.backend, inputs) == "triton":
            return triton_ops().cross_entropy_label_smooth(inputs, targets, self.epsilon, self.num_classes,
                                                        check_labels=False)
        return ref.cross_entropy_label_smooth(inputs, targets, self.epsilon, self.num_classes)


class SoftEntropy(nn.Module):
    """``forward(inputs, targets)``: ``mean_i sum_c -softmax(targets)_ic log_softmax(inputs)_ic``,
    ``targets`` (the teacher's logits) detached."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        resolve_backend(backend)
        self.backend = backend

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_features("inputs", inputs)
        _check_features("targets", targets)
        if targets.shape != inputs.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)} but inputs has {tuple(inputs.shape)}")
        if resolve_backend(self.backend, inputs) == "triton":
            return triton_ops().soft_entropy(inputs, targets)
        return ref.soft_entropy(inputs, targets)


class TripletLoss(nn.Module):
    """Batch-hard triplet loss with a margin ranking: ``mean max(d_ap - d_an + margin, 0)``.

    ``forward(emb, label)`` returns ``(loss, prec)``, ``prec`` the fraction of rows with
    ``d_an > d_ap`` (a 0-d tensor, no gradient). Euclidean distances ``sqrt(clamp(d2, 1e-12))``;
    ``normalize_feature`` L2-normalises ``emb`` first.
    """

    def __init__(self, margin: float, normalize_feature: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if margin is None:
            raise ValueError("TripletLoss needs a number for margin (margin ranking of d_an over d_ap)")
        resolve_backend(backend)
        self.margin, self.normalize_feature, self.backend = float(margin), bool(normalize_feature), backend

    def forward(self, emb: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_features("emb", emb)
        _check_batch_labels(label, emb.shape[0])
        x = _normalized(emb, self.normalize_feature)
        if resolve_backend(self.backend, emb) == "triton":
            return triton_ops().margin_triplet_loss(x, label, self.margin)
        d_ap, d_an, m = _mined_distances(emb, x, label, self.normalize_feature)
        per_row = (d_ap - d_an + self.margin).clamp_min(0.0)
        loss = torch.where(m.has_neg, per_row, torch.zeros_like(per_row)).mean()
        return loss, _ranked_fraction(d_ap, d_an, m.has_neg)


class SoftTripletLoss(nn.Module):
    """Softmax-triplet loss on ``log_softmax(d_ap, d_an)``, mined on ``emb1``'s own distances.

    ``forward(emb1, emb2, label)``: with a ``margin`` m, ``mean(-m log p_ap - (1 - m) log p_an)``
    (``emb2`` unused; m = 0 is MMT's hard term). With ``margin=None``, the soft term: the target is
    ``softmax`` of ``emb2``'s distances at ``emb1``'s mined pairs, detached, and the loss is
    ``mean_i sum_j -target_ij log p_ij``. ``normalize_feature`` L2-normalises both inputs first.
    """

    def __init__(self, margin: float | None = None, normalize_feature: bool = False, backend: str = "auto") -> None:
        super().__init__()
        resolve_backend(backend)
        self.margin = None if margin is None else float(margin)
        self.normalize_feature, self.backend = bool(normalize_feature), backend

    def forward(self, emb1: torch.Tensor, emb2: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        _check_features("emb1", emb1)
        _check_batch_labels(label, emb1.shape[0])
        x = _normalized(emb1, self.normalize_feature)
        t = None
        if self.margin is None:
            _check_features("emb2", emb2)
            if emb2.shape != emb1.shape:
                raise ValueError(f"emb2 has shape {tuple(emb2.shape)} but emb1 has {tuple(emb1.shape)}")
            t = _normalized(emb2.detach(), self.normalize_feature)
        if resolve_backend(self.backend, emb1) == "triton":
            if t is None:
                return triton_ops().margin_softmax_triplet_loss(x, label, self.margin)[0]
            return triton_ops().soft_softmax_triplet_loss(x, t, label)
        d_ap, d_an, m = _mined_distances(emb1, x, label, self.normalize_feature)
        if t is None:
            w: torch.Tensor | float = self.margin
        else:
            t_ap, t_an = ref.teacher_pair_distances(t, m)
            w = torch.sigmoid(t_ap - t_an)  # softmax(t_ap, t_an)[0]
        return _softmax_triplet(d_ap - d_an, w, m.has_neg)
