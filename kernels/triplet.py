"""Fused batch-hard softmax-triplet kernels (hard term and teacher-guided soft term).

Forward, one launch: a program owns BLOCK_M anchor rows and loops over column blocks of the
student features; each (rows x cols) tile of squared distances is built in registers
(:func:`sq_distance_tile`), turned into ``sqrt(clamp(., 1e-12))`` (diagonal exactly
``sqrt(1e-12)``), and folded into a running max over same-label columns / min over other-label
columns with their column index (strict comparisons over ascending column blocks, lowest index
inside a tile: ties go to the lowest column). The N x N matrix never exists in global memory, for
any N: larger N only means more column blocks per program (the columns are re-read once per row
block, N^2 D / BLOCK_M loads in all). After the loop the program reads the teacher rows of the
anchor and of its two mined partners and computes just those 2 teacher distances per row.

Per row it stores the hard term ``softplus(z)``, ``z = d_ap - d_an`` (or, with ``HINGE``, the
margin-ranking term ``max(z + margin, 0)``), the soft term ``w softplus(-z) + (1 - w) softplus(z)``
with ``w = sigmoid(t_ap - t_an)`` (teacher target) or, without a teacher, a constant ``w`` (a
softmax-triplet margin: ``-w log p_ap - (1 - w) log p_an``), the ranking indicator
``d_an > d_ap``, the mined indices and what the backward needs (the terms' derivatives in ``z``).
Rows without a negative store 0 terms, 0 derivatives and indicator 1 (their ``d_an`` is +inf).

Backward, one launch, no atomics (deterministic): with ``c_i`` the gradient w.r.t. ``z_i`` (the
upstream gradients times the stored derivatives), ``a_i = c_i / d_ap_i`` and
``b_i = -c_i / d_an_i`` (0 where the clamp is active or the pair is the anchor itself),
``dL/dx_i = sum_k W_ik (x_i - x_k)`` with
``W_ik = a_i[ap_i=k] + b_i[an_i=k] + a_k[ap_k=i] + b_k[an_k=i]``. A program owns (rows x D-block)
and builds the W tiles on the fly from the per-row vectors, so the scatter to the mined rows is a
small dense tile product instead of atomics.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastmmt.kernels.distance import block_sizes, clamp_sqrt, sq_distance_tile


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _sigmoid(z):
    """Overflow-free logistic function."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pick(values, cols, idx):
    """values[r, idx[r]] for a tile (idx inside the tile's column range)."""
    return tl.sum(tl.where(cols[None, :] == idx[:, None], values, 0.0), axis=1)


@triton.jit
def _pair_distance(t_ptr, rows, partner, rmask, stride_t, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row-wise ``|t_r - t_p|`` by the spec's formula; exactly sqrt(1e-12) where partner == row."""
    sq_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (offs < D)[None, :]
        a = tl.load(t_ptr + rows[:, None] * stride_t + offs[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(t_ptr + partner[:, None] * stride_t + offs[None, :], mask=m, other=0.0).to(tl.float32)
        sq_r += tl.sum(a * a, axis=1)
        sq_p += tl.sum(b * b, axis=1)
        dot += tl.sum(a * b, axis=1)
    d2 = (sq_r + sq_p) - 2.0 * dot
    return clamp_sqrt(tl.where(partner == rows, 0.0, d2))


@triton.jit
def _triplet_fwd(x_ptr, t_ptr, lab_ptr, loss_ptr, ap_ptr, an_ptr, aux_ptr, N, D, stride_x, stride_t,
                 hinge_margin, soft_weight,
                 HAS_TEACHER: tl.constexpr, HINGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    lab_r = tl.load(lab_ptr + rows, mask=rmask, other=0)
    best_p = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_n = tl.full((BLOCK_M,), float("inf"), tl.float32)
    d2_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d2_n = tl.zeros((BLOCK_M,), dtype=tl.float32)
    idx_p = tl.zeros((BLOCK_M,), dtype=tl.int32)
    idx_n = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        lab_c = tl.load(lab_ptr + cols, mask=cmask, other=0)
        d2 = sq_distance_tile(x_ptr, x_ptr, rows, cols, rmask, cmask, stride_x, stride_x, D,
                              BLOCK_M, BLOCK_N, BLOCK_D)
        d2 = tl.where(rows[:, None] == cols[None, :], 0.0, d2)
        dist = clamp_sqrt(d2)
        same = lab_r[:, None] == lab_c[None, :]
        cand = tl.where(same & cmask[None, :], dist, float("-inf"))
        tmax = tl.max(cand, axis=1)
        targ = tl.min(tl.where(cand == tmax[:, None], cols[None, :], 2147483647), axis=1)
        upd = tmax > best_p
        d2_p = tl.where(upd, _pick(d2, cols, targ), d2_p)
        best_p = tl.where(upd, tmax, best_p)
        idx_p = tl.where(upd, targ, idx_p)
        cand = tl.where((~same) & cmask[None, :], dist, float("inf"))
        tmin = tl.min(cand, axis=1)
        targ = tl.min(tl.where(cand == tmin[:, None], cols[None, :], 2147483647), axis=1)
        upd = tmin < best_n
        d2_n = tl.where(upd, _pick(d2, cols, targ), d2_n)
        best_n = tl.where(upd, tmin, best_n)
        idx_n = tl.where(upd, targ, idx_n)
    has_neg = best_n < float("inf")
    d_an = tl.where(has_neg, best_n, best_p)  # finite placeholder; the row's terms are masked
    z = tl.where(rmask, best_p - d_an, 0.0)  # padding rows have no positive (-inf): keep them finite
    sig = _sigmoid(z)
    if HINGE:  # margin ranking of (d_an, d_ap); derivative 1 where z + margin >= 0, as torch's clamp_min
        hard = tl.where(has_neg, tl.maximum(z + hinge_margin, 0.0), 0.0)
        dhard = tl.where(has_neg & (z + hinge_margin >= 0.0), 1.0, 0.0)
    else:
        hard = tl.where(has_neg, _softplus(z), 0.0)
        dhard = tl.where(has_neg, sig, 0.0)
    if HAS_TEACHER:
        t_ap = _pair_distance(t_ptr, rows, idx_p, rmask, stride_t, D, BLOCK_M, BLOCK_D)
        t_an = _pair_distance(t_ptr, rows, idx_n, rmask, stride_t, D, BLOCK_M, BLOCK_D)
        w = _sigmoid(t_ap - t_an)
    else:
        w = tl.zeros((BLOCK_M,), dtype=tl.float32) + soft_weight
    soft = tl.where(has_neg, w * _softplus(-z) + (1.0 - w) * _softplus(z), 0.0)
    dsoft = tl.where(has_neg, sig - w, 0.0)
    ranked = tl.where(has_neg & (best_n <= best_p), 0.0, 1.0)
    inv_p = tl.where(d2_p >= 1e-12, 1.0 / best_p, 0.0)
    inv_n = tl.where(has_neg & (d2_n >= 1e-12), 1.0 / d_an, 0.0)
    tl.store(loss_ptr + rows, hard, mask=rmask)
    tl.store(loss_ptr + N + rows, soft, mask=rmask)
    tl.store(loss_ptr + 2 * N + rows, ranked, mask=rmask)
    tl.store(ap_ptr + rows, idx_p, mask=rmask)
    tl.store(an_ptr + rows, idx_n, mask=rmask)
    tl.store(aux_ptr + rows, dhard, mask=rmask)
    tl.store(aux_ptr + N + rows, dsoft, mask=rmask)
    tl.store(aux_ptr + 2 * N + rows, inv_p, mask=rmask)
    tl.store(aux_ptr + 3 * N + rows, inv_n, mask=rmask)
    tl.store(aux_ptr + 4 * N + rows, best_p, mask=rmask)
    tl.store(aux_ptr + 5 * N + rows, tl.where(has_neg, best_n, 0.0), mask=rmask)


@triton.jit
def _pair_coefficients(aux_ptr, g_ptr, idx, mask, N):
    """(a, b): gradient factors of the (anchor, positive) and (anchor, negative) pairs."""
    g_hard = tl.load(g_ptr)
    g_soft = tl.load(g_ptr + 1)
    dhard = tl.load(aux_ptr + idx, mask=mask, other=0.0)
    dsoft = tl.load(aux_ptr + N + idx, mask=mask, other=0.0)
    c = (g_hard * dhard + g_soft * dsoft) / N
    a = c * tl.load(aux_ptr + 2 * N + idx, mask=mask, other=0.0)
    b = -c * tl.load(aux_ptr + 3 * N + idx, mask=mask, other=0.0)
    return a, b


@triton.jit
def _triplet_bwd(x_ptr, ap_ptr, an_ptr, aux_ptr, g_ptr, out_ptr, N, D, stride_x, stride_o,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask, dmask = rows < N, offs < D
    a_r, b_r = _pair_coefficients(aux_ptr, g_ptr, rows, rmask, N)
    ap_r = tl.load(ap_ptr + rows, mask=rmask, other=-1)
    an_r = tl.load(an_ptr + rows, mask=rmask, other=-1)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        a_c, b_c = _pair_coefficients(aux_ptr, g_ptr, cols, cmask, N)
        ap_c = tl.load(ap_ptr + cols, mask=cmask, other=-1)
        an_c = tl.load(an_ptr + cols, mask=cmask, other=-1)
        w = (tl.where(ap_r[:, None] == cols[None, :], a_r[:, None], 0.0)
             + tl.where(an_r[:, None] == cols[None, :], b_r[:, None], 0.0)
             + tl.where(ap_c[None, :] == rows[:, None], a_c[None, :], 0.0)
             + tl.where(an_c[None, :] == rows[:, None], b_c[None, :], 0.0))
        xc = tl.load(x_ptr + cols[:, None] * stride_x + offs[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(w, xc, acc, input_precision="ieee")
        wsum += tl.sum(w, axis=1)
    xr = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    grad = wsum[:, None] * xr - acc
    tl.store(out_ptr + rows[:, None] * stride_o + offs[None, :], grad.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


class TripletForward(NamedTuple):
    """Per-row outputs of the fused forward (``aux`` is the backward's saved state)."""

    row_losses: torch.Tensor  # (3, N) float32: hard, soft, ranking indicator (d_an > d_ap)
    ap_idx: torch.Tensor  # (N,) int32
    an_idx: torch.Tensor  # (N,) int32
    aux: torch.Tensor  # (6, N) float32: d hard/dz, d soft/dz, 1/d_ap, 1/d_an, d_ap, d_an

    @property
    def d_ap(self) -> torch.Tensor:
        return self.aux[4]

    @property
    def d_an(self) -> torch.Tensor:
        return self.aux[5]


def triplet_forward(x: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                    hinge_margin: float | None = None, soft_weight: float = 0.0) -> TripletForward:
    """Mining, hard, soft and ranking terms per row, one launch; inputs contiguous, checked.

    ``hinge_margin``: the hard term is ``max(d_ap - d_an + margin, 0)`` instead of ``softplus``.
    ``soft_weight``: without ``teacher``, the soft term's constant target weight on ``d_ap``.
    """
    n, dim = x.shape
    dev = x.device
    losses = torch.empty((3, n), dtype=torch.float32, device=dev)
    ap = torch.empty(n, dtype=torch.int32, device=dev)
    an = torch.empty(n, dtype=torch.int32, device=dev)
    aux = torch.empty((6, n), dtype=torch.float32, device=dev)
    bm, bn, bd = block_sizes(dev)
    t = x if teacher is None else teacher
    _triplet_fwd[(triton.cdiv(n, bm),)](x, t, labels, losses, ap, an, aux, n, dim, x.stride(0), t.stride(0),
                                        float(hinge_margin or 0.0), float(soft_weight),
                                        HAS_TEACHER=teacher is not None, HINGE=hinge_margin is not None,
                                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return TripletForward(losses, ap, an, aux)


def triplet_backward(x: torch.Tensor, fwd: TripletForward, grads: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``x`` (dtype of ``x``) given ``grads = [dL/d hard, dL/d soft]`` (float32)."""
    n, dim = x.shape
    out = torch.empty_like(x)
    bm, bn, bd = block_sizes(x.device)
    _triplet_bwd[(triton.cdiv(n, bm), triton.cdiv(dim, bd))](
        x, fwd.ap_idx, fwd.an_idx, fwd.aux, grads, out, n, dim, x.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return out
