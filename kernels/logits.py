"""Fused label-smoothed cross-entropy + soft entropy over a student/teacher logits pair.

Forward, one pass over the (N x K) logits: a program owns BLOCK_M rows and walks the classes in
BLOCK_K columns, keeping online-softmax state for the student (running max, rescaled sum of exps,
plain sum, the label's logit) and for the teacher (running max, rescaled sum of exps, and the
rescaled sum of ``exp(t - m_t) * s``). At the end, with ``lse`` the student's log-sum-exp and
``u = eps / C`` the smoothing mass per class (C = ``num_classes``, normally the K columns):
``CE_i = (1 - eps + K u) lse - (1 - eps) s_iy - u sum_c s_ic`` and
``SE_i = lse - E_{softmax(t_i)}[s_i]``. A label outside [0, K) makes its row's CE (and its
gradient) NaN, so bad labels show without a host-side check. It stores the per-row terms and both
log-sum-exps (the backward's saved state).

Backward, one pass, fully parallel over (row, class) tiles:
``dL/ds = (g_ce ((1 - eps + K u) softmax(s) - (1 - eps) onehot(y) - u)
+ g_se (softmax(s) - softmax(t))) / N``, written in the logits' dtype. The teacher gets no gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_fwd(s_ptr, t_ptr, lab_ptr, loss_ptr, lse_ptr, N, K, stride_s, stride_t, epsilon, smooth,
                HAS_TEACHER: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    if HAS_LABELS:
        lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        m = rmask[:, None] & cmask[None, :]
        s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
        s_inf = tl.where(cmask[None, :], s, float("-inf"))
        new_m = tl.maximum(m_s, tl.max(s_inf, axis=1))
        l_s = l_s * tl.exp(m_s - new_m) + tl.sum(tl.exp(s_inf - new_m[:, None]), axis=1)
        m_s = new_m
        sum_s += tl.sum(s, axis=1)
        if HAS_LABELS:
            s_y += tl.sum(tl.where(cols[None, :] == lab[:, None], s, 0.0), axis=1)
        if HAS_TEACHER:
            t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
            t_inf = tl.where(cmask[None, :], t, float("-inf"))
            new_m = tl.maximum(m_t, tl.max(t_inf, axis=1))
            scale = tl.exp(m_t - new_m)
            e = tl.exp(t_inf - new_m[:, None])
            l_t = l_t * scale + tl.sum(e, axis=1)
            a_t = a_t * scale + tl.sum(e * s, axis=1)
            m_t = new_m
    lse_s = m_s + tl.log(l_s)
    ce = (1.0 - epsilon + smooth * K) * lse_s - (1.0 - epsilon) * s_y - smooth * sum_s
    if HAS_LABELS:
        ce = tl.where((lab >= 0) & (lab < K), ce, float("nan"))
    tl.store(loss_ptr + rows, ce, mask=rmask)
    tl.store(lse_ptr + rows, lse_s, mask=rmask)
    if HAS_TEACHER:
        tl.store(loss_ptr + N + rows, lse_s - a_t / l_t, mask=rmask)
        tl.store(lse_ptr + N + rows, m_t + tl.log(l_t), mask=rmask)


@triton.jit
def _logits_bwd(s_ptr, t_ptr, lab_ptr, lse_ptr, g_ptr, out_ptr, N, K, stride_s, stride_t, stride_o, epsilon,
                smooth,
                HAS_TEACHER: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask, cmask = rows < N, cols < K
    m = rmask[:, None] & cmask[None, :]
    g_ce = tl.load(g_ptr) / N
    g_se = tl.load(g_ptr + 1) / N
    s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
    lse_s = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    p_s = tl.exp(s - lse_s[:, None])
    grad = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_LABELS:
        lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
        target = tl.where(cols[None, :] == lab[:, None], 1.0 - epsilon, 0.0) + smooth
        valid = (lab >= 0) & (lab < K)
        grad += tl.where(valid[:, None], g_ce * ((1.0 - epsilon + smooth * K) * p_s - target), float("nan"))
    if HAS_TEACHER:
        t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
        lse_t = tl.load(lse_ptr + N + rows, mask=rmask, other=0.0)
        grad += g_se * (p_s - tl.exp(t - lse_t[:, None]))
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], grad.to(out_ptr.dtype.element_ty), mask=m)


class LogitsForward(NamedTuple):
    """Per-row outputs of the fused forward: (2, N) [CE, SE] terms and (2, N) [lse_s, lse_t]."""

    row_losses: torch.Tensor
    lse: torch.Tensor


# (BLOCK_M, BLOCK_K): the interpreter's cost is per program step, so it takes wide row blocks.
CUDA_BLOCKS = (4, 1024)
INTERPRETER_BLOCKS = (32, 512)


def _blocks(device: torch.device) -> tuple[int, int]:
    return CUDA_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


def _smooth(epsilon: float, num_classes: int | None, k: int) -> float:
    """Smoothing mass per class, ``eps / num_classes`` (``num_classes`` defaults to the K columns)."""
    return float(epsilon) / (k if num_classes is None else num_classes)


def logits_forward(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                   epsilon: float, num_classes: int | None = None) -> LogitsForward:
    """CE (when ``labels``) and SE (when ``teacher``) per row in one pass; inputs contiguous, checked.

    ``num_classes`` (default: the K columns) is the count the smoothing mass ``eps`` is spread over.
    """
    n, k = student.shape
    dev = student.device
    alloc = torch.empty if teacher is not None else torch.zeros  # row 1 is written only with a teacher
    losses = alloc((2, n), dtype=torch.float32, device=dev)
    lse = alloc((2, n), dtype=torch.float32, device=dev)
    bm, bk = _blocks(dev)
    t = student if teacher is None else teacher
    lab = labels if labels is not None else lse  # placeholder pointer, never read
    _logits_fwd[(triton.cdiv(n, bm),)](student, t, lab, losses, lse, n, k, student.stride(0), t.stride(0),
                                       float(epsilon), _smooth(epsilon, num_classes, k),
                                       HAS_TEACHER=teacher is not None, HAS_LABELS=labels is not None,
                                       BLOCK_M=bm, BLOCK_K=bk)
    return LogitsForward(losses, lse)


def logits_backward(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                    fwd: LogitsForward, grads: torch.Tensor, epsilon: float,
                    num_classes: int | None = None) -> torch.Tensor:
    """Gradient w.r.t. the student logits (their dtype) given ``grads = [dL/dCE, dL/dSE]`` (float32)."""
    n, k = student.shape
    out = torch.empty_like(student)
    bm, bk = _blocks(student.device)
    t = student if teacher is None else teacher
    lab = labels if labels is not None else fwd.lse
    _logits_bwd[(triton.cdiv(n, bm), triton.cdiv(k, bk))](
        student, t, lab, fwd.lse, grads, out, n, k, student.stride(0), t.stride(0), out.stride(0),
        float(epsilon), _smooth(epsilon, num_classes, k), HAS_TEACHER=teacher is not None,
        HAS_LABELS=labels is not None, BLOCK_M=bm, BLOCK_K=bk)
    return out
