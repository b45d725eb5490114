"""Memory-bank contrastive loss (Cluster Contrast's ClusterMemory) and the ordered momentum update.

Forward, one launch: a program owns BLOCK_M input rows. It first reads the rows once for their
norms (``x_hat = x / max(|x|, 1e-12)``, as ``F.normalize``), then walks the K memory rows in
BLOCK_N blocks: each logits tile ``z = (x M^T) / (|x| temp)`` is a tile product over D, is written
out (the backward reads it instead of recomputing it) and folded into an online softmax (running
max, rescaled sum of exps) and the target's logit. Per row it stores the cross-entropy
``lse - z_t``, ``lse`` and ``1 / max(|x|, 1e-12)``. A target outside [0, K) makes its row's loss
NaN (no host-side check).

Backward, one launch over (row block, D block) tiles: ``p = g (softmax(z) - onehot(t)) / B`` is
rebuilt from the stored logits, ``G = p M / temp`` is a tile product over K, and the normalisation's
backward needs ``x_hat . G = sum_k p_k z_k``, which every D block gets from the same pass over z:
``dx = (G - x_hat (x_hat . G)) / |x|`` (``G / 1e-12`` where the norm clamp is active). No atomics.

Ordered update, one launch, one program per batch sample: the program whose sample is the FIRST of
its memory row in the batch owns that row (so rows run in parallel and each row has one owner);
it keeps the row in registers and walks the batch from its sample on, applying
``c <- m c + (1 - m) x_hat_j`` then ``c <- c / |c|`` for every sample j of that row, in batch
order. ``HARD``: it applies one update with the row's sample of LOWEST similarity ``x_hat_j . c``
(first such sample on ties). Samples whose row lies outside [0, K) are skipped.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

NORM_EPS = 1e-12  # F.normalize's clamp of the norm

# (BLOCK_M, BLOCK_N, BLOCK_D) of the loss kernels. The interpreter's cost is per program step
# (few, long steps); CUDA takes tensor-core-sized tiles.
CUDA_BLOCKS = (64, 64, 32)
INTERPRETER_BLOCKS = (16, 32, 64)


def block_sizes(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for tensors on ``device``."""
    return CUDA_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


@triton.jit
def _cm_fwd(x_ptr, m_ptr, t_ptr, z_ptr, row_ptr, B, K, D, stride_x, stride_m, stride_z, inv_temp,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + offs[None, :],
                    mask=rmask[:, None] & (offs < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(a * a, axis=1)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    scale = inv_norm * inv_temp
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, K, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dmask = (offs < D)[None, :]
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + offs[None, :],
                        mask=rmask[:, None] & dmask, other=0.0).to(tl.float32)
            b = tl.load(m_ptr + cols[:, None].to(tl.int64) * stride_m + offs[None, :],
                        mask=cmask[:, None] & dmask, other=0.0).to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        z = acc * scale[:, None]
        tl.store(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], z,
                 mask=rmask[:, None] & cmask[None, :])
        z = tl.where(cmask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    loss = tl.where((tgt >= 0) & (tgt < K), lse - z_t, float("nan"))
    tl.store(row_ptr + rows, loss, mask=rmask)
    tl.store(row_ptr + B + rows, lse, mask=rmask)
    tl.store(row_ptr + 2 * B + rows, inv_norm, mask=rmask)


@triton.jit
def _cm_bwd(x_ptr, m_ptr, t_ptr, z_ptr, row_ptr, g_ptr, out_ptr, B, K, D, stride_x, stride_m, stride_z,
            stride_o, inv_temp, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask, dmask = rows < B, offs < D
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(row_ptr + B + rows, mask=rmask, other=0.0)
    inv_norm = tl.load(row_ptr + 2 * B + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr) / B
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dot_xg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, K, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < K
        tile = rmask[:, None] & cmask[None, :]
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], mask=tile, other=0.0)
        p = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        p = tl.where(tile, p * g, 0.0)
        dot_xg += tl.sum(p * z, axis=1)
        mem = tl.load(m_ptr + cols[:, None].to(tl.int64) * stride_m + offs[None, :],
                      mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(p, mem, acc, input_precision="ieee")
    xs = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + offs[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    x_hat = xs * inv_norm[:, None]
    clamped = inv_norm >= 1e12  # |x| <= 1e-12: F.normalize divides by the constant 1e-12
    grad = acc * inv_temp
    grad = tl.where(clamped[:, None], grad, grad - x_hat * dot_xg[:, None]) * inv_norm[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + offs[None, :],
             grad.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _ordered_update(x_ptr, scale_ptr, m_ptr, t_ptr, B, K, D, stride_x, stride_m, momentum,
                    HARD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    batch = tl.arange(0, BLOCK_B)
    all_t = tl.load(t_ptr + batch, mask=batch < B, other=-1)
    row = tl.load(t_ptr + i)
    first = tl.min(tl.where(all_t == row, batch, BLOCK_B), axis=0)
    if (first == i) & (row >= 0) & (row < K):
        offs = tl.arange(0, BLOCK_D)
        dmask = offs < D
        m_row = m_ptr + row.to(tl.int64) * stride_m
        c = tl.load(m_row + offs, mask=dmask, other=0.0).to(tl.float32)
        if HARD:
            best = float("inf")
            pick = i
            for j in range(i, B):
                if tl.load(t_ptr + j) == row:
                    xj = tl.load(x_ptr + j * stride_x + offs, mask=dmask, other=0.0).to(tl.float32)
                    sim = tl.sum(xj * c, axis=0) * tl.load(scale_ptr + j)
                    if sim < best:
                        best = sim
                        pick = j
            xj = tl.load(x_ptr + pick * stride_x + offs, mask=dmask, other=0.0).to(tl.float32)
            c = momentum * c + (1.0 - momentum) * xj * tl.load(scale_ptr + pick)
            c = c / tl.sqrt(tl.sum(c * c, axis=0))
        else:
            for j in range(i, B):
                if tl.load(t_ptr + j) == row:
                    xj = tl.load(x_ptr + j * stride_x + offs, mask=dmask, other=0.0).to(tl.float32)
                    c = momentum * c + (1.0 - momentum) * xj * tl.load(scale_ptr + j)
                    c = c / tl.sqrt(tl.sum(c * c, axis=0))
        tl.store(m_row + offs, c.to(m_ptr.dtype.element_ty), mask=dmask)


class ClusterMemoryForward(NamedTuple):
    """Outputs of the fused forward (``logits`` and ``rows`` are the backward's saved state)."""

    logits: torch.Tensor  # (B, K) float32, x_hat M^T / temp
    rows: torch.Tensor  # (3, B) float32: cross-entropy, log-sum-exp, 1 / max(|x|, 1e-12)

    @property
    def inv_norm(self) -> torch.Tensor:
        return self.rows[2]


def cluster_memory_forward(x: torch.Tensor, memory: torch.Tensor, targets: torch.Tensor,
                           temp: float) -> ClusterMemoryForward:
    """Normalise + logits + per-row cross-entropy, one launch; inputs contiguous, checked by the caller."""
    b, dim = x.shape
    k = memory.shape[0]
    logits = torch.empty((b, k), dtype=torch.float32, device=x.device)
    rows = torch.empty((3, b), dtype=torch.float32, device=x.device)
    bm, bn, bd = block_sizes(x.device)
    _cm_fwd[(triton.cdiv(b, bm),)](x, memory, targets, logits, rows, b, k, dim, x.stride(0), memory.stride(0),
                                   logits.stride(0), 1.0 / temp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return ClusterMemoryForward(logits, rows)


def cluster_memory_backward(x: torch.Tensor, memory: torch.Tensor, targets: torch.Tensor,
                            fwd: ClusterMemoryForward, grad: torch.Tensor, temp: float) -> torch.Tensor:
    """Gradient w.r.t. ``x`` (dtype of ``x``) of ``grad * mean cross-entropy`` (``grad`` a float32
    device scalar), reading ``memory`` as it is now (before this step's update)."""
    b, dim = x.shape
    k = memory.shape[0]
    out = torch.empty_like(x)
    bm, bn, bd = block_sizes(x.device)
    _cm_bwd[(triton.cdiv(b, bm), triton.cdiv(dim, bd))](
        x, memory, targets, fwd.logits, fwd.rows, grad, out, b, k, dim, x.stride(0), memory.stride(0),
        fwd.logits.stride(0), out.stride(0), 1.0 / temp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return out


def ordered_update_(memory: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, indexes: torch.Tensor,
                    momentum: float, hard: bool = False) -> None:
    """In place: the momentum update of ``memory`` rows ``indexes`` by ``scale_j x_j``, per row in
    batch order (``hard``: once per row, with its least similar sample); one launch, no host read."""
    b, dim = x.shape
    _ordered_update[(b,)](x, scale, memory, indexes, b, memory.shape[0], dim, x.stride(0), memory.stride(0),
                          float(momentum), HARD=bool(hard), BLOCK_B=triton.next_power_of_2(b),
                          BLOCK_D=triton.next_power_of_2(dim))
