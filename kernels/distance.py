"""Triton kernels for the spec's Euclidean distance ``sqrt(clamp(|a|^2 + |b|^2 - 2ab, min=1e-12))``.

Every load is upcast to float32 and every ``tl.dot`` runs with ``input_precision="ieee"`` (no
TF32), so fp32/fp16/bf16 inputs all get the float32 arithmetic of the reference. The jitted tile
helpers here are reused by the fused triplet kernel in :mod:`fastmmt.kernels.triplet`.

Backward of ``d = pairwise(x, y)``: ``dL/dx_i = sum_j W_ij (x_i - y_j)`` with
``W_ij = g_ij / d_ij`` where the clamp is inactive (``d_ij > sqrt(1e-12)``), else 0; the self
case (``y is None``) sums ``W + W^T``. It is a second tiled pass (no atomics: deterministic).

Row and column indices are int64 before they meet a stride: ``N * D`` (or ``N * M`` for the
distance matrix and its gradient) passes 2^31 at N ~ 1M features of D 2048, and an int32 offset
would wrap around to another address.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

EPS_SQ = 1e-12


@triton.jit
def sq_distance_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, stride_a, stride_b, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``|a_r|^2 + |b_c|^2 - 2 a_r.b_c`` for a (rows x cols) tile, float32, looping over D."""
    rows, cols = rows.to(tl.int64), cols.to(tl.int64)  # row * stride may pass 2^31
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        dmask = offs < D
        a = tl.load(a_ptr + rows[:, None] * stride_a + offs[None, :],
                    mask=row_mask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols[:, None] * stride_b + offs[None, :],
                    mask=col_mask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        dot = tl.dot(a, tl.trans(b), dot, input_precision="ieee")
        sq_a += tl.sum(a * a, axis=1)
        sq_b += tl.sum(b * b, axis=1)
    return (sq_a[:, None] + sq_b[None, :]) - 2.0 * dot


@triton.jit
def clamp_sqrt(d2):
    """The spec's ``sqrt(clamp(d2, min=1e-12))`` with IEEE-rounded sqrt."""
    return tl.sqrt_rn(tl.maximum(d2, 1e-12))


@triton.jit
def _pairwise_fwd(x_ptr, y_ptr, out_ptr, N, M, D, stride_x, stride_y, stride_o,
                  SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < N, cols < M
    d2 = sq_distance_tile(x_ptr, y_ptr, rows, cols, rmask, cmask, stride_x, stride_y, D,
                          BLOCK_M, BLOCK_N, BLOCK_D)
    if SELF:  # the diagonal is exactly sqrt(1e-12): no rounding noise through the sqrt
        d2 = tl.where(rows[:, None] == cols[None, :], 0.0, d2)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], clamp_sqrt(d2),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _weight_tile(g_ptr, d_ptr, rows, cols, mask, sg0, sg1, sd0, sd1):
    """``g / d`` where the clamp is inactive, else 0 (the diagonal of a self matrix included)."""
    g = tl.load(g_ptr + rows[:, None] * sg0 + cols[None, :] * sg1, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + rows[:, None] * sd0 + cols[None, :] * sd1, mask=mask, other=1.0)
    floor = tl.sqrt_rn(tl.full(d.shape, 1e-12, tl.float32))
    return tl.where(d > floor, g / d, 0.0)


@triton.jit
def _pairwise_bwd(g_ptr, d_ptr, a_ptr, b_ptr, out_ptr, NA, NB, D, sg0, sg1, sd0, sd1, stride_a, stride_b,
                  stride_o, SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """``out_i = sum_j W_ij (a_i - b_j)`` for one (rows x D-block) tile; W from (g, d)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask, dmask = rows < NA, offs < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, NB, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < NB
        m = rmask[:, None] & cmask[None, :]
        w = _weight_tile(g_ptr, d_ptr, rows, cols, m, sg0, sg1, sd0, sd1)
        if SELF:
            w += _weight_tile(g_ptr, d_ptr, rows, cols, m, sg1, sg0, sd1, sd0)
        b = tl.load(b_ptr + cols[:, None] * stride_b + offs[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(w, b, acc, input_precision="ieee")
        wsum += tl.sum(w, axis=1)
    a = tl.load(a_ptr + rows[:, None] * stride_a + offs[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    grad = wsum[:, None] * a - acc
    tl.store(out_ptr + rows[:, None] * stride_o + offs[None, :], grad.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_D) of the distance and triplet kernels. The interpreter's cost is per
# program step, so it takes few, long D steps; CUDA takes the usual tensor-core-sized tiles.
CUDA_BLOCKS = (64, 64, 32)
INTERPRETER_BLOCKS = (32, 32, 128)
# The backward's CUDA tiles, best first, with the shared memory they take in float32 (the most of
# any dtype) under Triton's default 3-stage pipeline, as triton.compile reports it for sm_86 and
# sm_90 (test_triton_distance checks these figures against the compiler). 160 KB fits sm_80/90
# (163/227 KB) but not sm_86/89 (99 KB).
CUDA_BWD_BLOCKS = (((64, 64, 32), 163840), ((64, 32, 32), 81920))


def block_sizes(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for tensors on ``device``."""
    return CUDA_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


@functools.lru_cache(maxsize=None)
def shared_memory_limit(index: int) -> int:
    """Bytes of shared memory one block may use on CUDA device ``index`` (the opt-in maximum
    Triton's launcher checks a kernel against)."""
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def bwd_block_sizes(device: torch.device, limit: int | None = None) -> tuple[int, int, int]:
    """The backward's tiles on ``device``: the first of :data:`CUDA_BWD_BLOCKS` that fits its
    shared memory (``limit`` bytes; default: the device's)."""
    if device.type != "cuda":
        return INTERPRETER_BLOCKS
    if limit is None:
        limit = shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())
    for blocks, need in CUDA_BWD_BLOCKS:
        if need <= limit:
            return blocks
    return CUDA_BWD_BLOCKS[-1][0]


def pairwise_forward(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Float32 (N x M) distances of contiguous 2-D ``x`` and ``y`` (``y=None``: self, exact diagonal)."""
    other = x if y is None else y
    n, dim = x.shape
    m = other.shape[0]
    out = torch.empty((n, m), dtype=torch.float32, device=x.device)
    bm, bn, bd = block_sizes(x.device)
    grid = (triton.cdiv(n, bm), triton.cdiv(m, bn))
    _pairwise_fwd[grid](x, other, out, n, m, dim, x.stride(0), other.stride(0), out.stride(0),
                        SELF=y is None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return out


def pairwise_backward(grad: torch.Tensor, dist: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      self_matrix: bool, transpose: bool = False) -> torch.Tensor:
    """Gradient for the rows of ``a`` of ``sum(grad * dist)``; ``transpose`` reads grad/dist as (M x N)."""
    na, dim = a.shape
    nb = b.shape[0]
    out = torch.empty_like(a)
    bm, bn, bd = bwd_block_sizes(a.device)
    sg0, sg1 = grad.stride()
    sd0, sd1 = dist.stride()
    if transpose:
        sg0, sg1, sd0, sd1 = sg1, sg0, sd1, sd0
    grid = (triton.cdiv(na, bm), triton.cdiv(dim, bd))
    _pairwise_bwd[grid](grad, dist, a, b, out, na, nb, dim, sg0, sg1, sd0, sd1, a.stride(0), b.stride(0),
                        out.stride(0), SELF=self_matrix, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return out
