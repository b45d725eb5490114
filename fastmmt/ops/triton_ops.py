"""Triton backend of the MMT losses: ``torch.autograd.Function`` wrappers of ``fastmmt.kernels``.

Same signatures and results as :mod:`fastmmt.ops.reference` (see its docstring for the
conventions). Inputs may be float32, float16 or bfloat16 (computed in float32); losses and
distances are float32, gradients come back in the input's dtype. Teachers never get gradients.
Inputs are made contiguous; shapes, dtypes and devices are checked with errors naming the problem.
"""
from __future__ import annotations

import torch

from fastmmt.kernels import distance, logits, triplet
from fastmmt.ops._dispatch import triton_interpreter_on

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_matrix(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x columns), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}; the triton backend takes float32, float16 or "
                        "bfloat16 (use backend='torch' for float64)")
    if t.device.type != "cuda" and not triton_interpreter_on():
        raise ValueError(f"{name} is on {t.device}: the triton backend runs compiled kernels on CUDA tensors, "
                         "or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton "
                         "is imported); move the inputs to CUDA or use backend='torch'")
    return t.contiguous()


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    t = _check_matrix(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return t


def _check_labels(labels: torch.Tensor, n: int, device: torch.device, num_classes: int | None = None
                  ) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match {n} rows, got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")
    if num_classes is not None:  # one reduction and one host sync
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) for {num_classes} classes, got [{lo}, {hi}]")
    return labels.contiguous()


def _grad_pair(g_a: torch.Tensor | None, g_b: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The two upstream scalar gradients as one float32 device vector (None -> 0), no host sync."""
    if g_a is None or g_b is None:
        zero = torch.zeros((), dtype=torch.float32, device=like.device)
        g_a, g_b = (zero if g is None else g for g in (g_a, g_b))
    return torch.stack([g_a, g_b]).to(torch.float32)


class _LogitsPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, epsilon, num_classes=None):
        out = logits.logits_forward(student, teacher, labels, epsilon, num_classes)
        ctx.save_for_backward(student, teacher, labels, out.lse)
        ctx.epsilon, ctx.has_teacher, ctx.has_labels = epsilon, teacher is not None, labels is not None
        ctx.num_classes = num_classes
        means = out.row_losses.sum(1) / student.shape[0]
        return means[0], means[1]

    @staticmethod
    def backward(ctx, g_ce, g_se):
        student, teacher, labels, lse = ctx.saved_tensors
        fwd = logits.LogitsForward(None, lse)
        grad = logits.logits_backward(student, teacher if ctx.has_teacher else None,
                                      labels if ctx.has_labels else None, fwd,
                                      _grad_pair(g_ce, g_se, student), ctx.epsilon, ctx.num_classes)
        return grad, None, None, None, None


class _TripletPair(torch.autograd.Function):
    """(hard, soft, ranked fraction) means; the last is not differentiable."""

    @staticmethod
    def forward(ctx, student, teacher, labels, hinge_margin=None, soft_weight=0.0):
        out = triplet.triplet_forward(student, teacher, labels, hinge_margin, soft_weight)
        ctx.save_for_backward(student, out.ap_idx, out.an_idx, out.aux)
        hard, soft, ranked = (out.row_losses.sum(1) / student.shape[0]).unbind(0)
        ctx.mark_non_differentiable(ranked)
        return hard, soft, ranked

    @staticmethod
    def backward(ctx, g_hard, g_soft, _g_ranked):
        student, ap, an, aux = ctx.saved_tensors
        fwd = triplet.TripletForward(None, ap, an, aux)
        grad = triplet.triplet_backward(student, fwd, _grad_pair(g_hard, g_soft, student))
        return grad, None, None, None, None


class _Pairwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        dist = distance.pairwise_forward(x, y)
        ctx.save_for_backward(x, y, dist)
        ctx.self_matrix = y is None
        return dist

    @staticmethod
    def backward(ctx, grad):
        x, y, dist = ctx.saved_tensors
        if ctx.self_matrix:
            return distance.pairwise_backward(grad, dist, x, x, self_matrix=True), None
        gx = distance.pairwise_backward(grad, dist, x, y, False) if ctx.needs_input_grad[0] else None
        gy = distance.pairwise_backward(grad, dist, y, x, False, transpose=True) if ctx.needs_input_grad[1] else None
        return gx, gy


def _logits_inputs(student_logits, teacher_logits, labels, name_s="student_logits", check_labels=True):
    s = _check_matrix(name_s, student_logits)
    t = None if teacher_logits is None else _check_same("teacher_logits", teacher_logits.detach(), name_s, s)
    k = s.shape[1] if check_labels else None  # the range check: one reduction and one host read
    lab = None if labels is None else _check_labels(labels, s.shape[0], s.device, k)
    return s, t, lab


def cross_entropy_label_smooth(logits_: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1,
                               num_classes: int | None = None, check_labels: bool = True) -> torch.Tensor:
    """Label-smoothed cross-entropy (targets ``(1-eps)`` one-hot + ``eps/C``), mean over rows.

    ``num_classes`` C defaults to the K columns. ``check_labels=False`` skips the host-synchronising
    label-range check (shape, dtype and device are still checked); a label outside [0, K) then makes
    the loss NaN instead of raising.
    """
    s, _, lab = _logits_inputs(logits_, None, labels, "logits", check_labels)
    return _LogitsPair.apply(s, None, lab, float(epsilon), num_classes)[0]


def soft_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_c -softmax(teacher)_ic log_softmax(student)_ic``; teacher detached."""
    s, t, _ = _logits_inputs(student_logits, teacher_logits, None)
    return _LogitsPair.apply(s, t, None, 0.0)[1]


def logits_pair_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       epsilon: float = 0.1, check_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed CE, soft entropy) of one student in one pass over its logits."""
    s, t, lab = _logits_inputs(student_logits, teacher_logits, labels, check_labels=check_labels)
    return _LogitsPair.apply(s, t, lab, float(epsilon))


def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 distances ``sqrt(clamp(|a|^2+|b|^2-2ab, 1e-12))``; ``y=None``: self, exact diagonal."""
    x = _check_matrix("x", x)
    if y is not None:
        y = _check_matrix("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"x has {x.shape[1]} columns but y has {y.shape[1]}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
    return _Pairwise.apply(x, y)


def _triplet_inputs(student, teacher, labels):
    s = _check_matrix("student_features", student)
    t = None if teacher is None else _check_same("teacher_features", teacher.detach(), "student_features", s)
    return s, t, _check_labels(labels, s.shape[0], s.device)


def softmax_triplet_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard softmax-triplet (margin 0) with batch-hard mining, one fused kernel."""
    s, _, lab = _triplet_inputs(features, None, labels)
    return _TripletPair.apply(s, None, lab)[0]


def margin_triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch-hard ``mean max(d_ap - d_an + margin, 0)``, fraction of rows with d_an > d_ap), one launch."""
    s, _, lab = _triplet_inputs(features, None, labels)
    hard, _, ranked = _TripletPair.apply(s, None, lab, float(margin), 0.0)
    return hard, ranked


def margin_softmax_triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``mean(-margin log p_ap - (1 - margin) log p_an)`` over the softmax of (d_ap, d_an), ranked
    fraction), one launch; margin 0 is the hard softmax-triplet."""
    s, _, lab = _triplet_inputs(features, None, labels)
    _, soft, ranked = _TripletPair.apply(s, None, lab, None, float(margin))
    return soft, ranked


def soft_softmax_triplet_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft softmax-triplet: the teacher's distances at the student-mined pairs give the target."""
    s, t, lab = _triplet_inputs(student, teacher, labels)
    return _TripletPair.apply(s, t, lab)[1]


def triplet_pair_losses(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard, soft) softmax-triplet terms from one fused launch (one mining for both)."""
    s, t, lab = _triplet_inputs(student, teacher, labels)
    hard, soft, _ = _TripletPair.apply(s, t, lab)
    return hard, soft
