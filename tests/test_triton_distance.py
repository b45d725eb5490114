"""Triton pairwise Euclidean distance (on ``device``: compiled on CUDA, interpreted on CPU)
against reference.py in float64 on CPU.

Fresh random inputs each run (seed printed; pin with FASTMMT_TEST_SEED). Distances: relative
tolerance 1e-5 of the largest distance (float32 compute on the exact input values; FMA
contraction on CUDA moves d^2 by ~|x|^2 * 2^-24, far below it). Gradients, relative to the
largest reference entry: fp32 ``tol.grad`` (conftest), fp16 2e-3, bf16 1.6e-2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastmmt.ops import losses
from fastmmt.ops import reference as ref
from fastmmt.ops import triton_ops

GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FLOOR = torch.tensor(1e-12, dtype=torch.float32).sqrt().item()


def _cpu_leaf(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of leaf ``t`` carrying its gradient (for comparisons on CPU)."""
    out = t.detach().cpu()
    out.grad = t.grad.cpu()
    return out


def _check(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, device: torch.device,
           tol32: float = 1e-4) -> None:
    """Kernel on ``device`` against the float64 reference on CPU copies of the same inputs."""
    dtype = x.dtype
    xg = x.detach().to(device).requires_grad_()
    yg = None if y is None else y.detach().to(device).requires_grad_()
    d = triton_ops.pairwise_euclidean(xg, yg)
    g = torch.randn(d.shape, generator=gen)
    (d * g.to(device)).sum().backward()
    d, xg, yg = d.cpu(), _cpu_leaf(xg), None if yg is None else _cpu_leaf(yg)
    assert d.dtype == torch.float32 and xg.grad.dtype == dtype

    x64 = x.detach().double().requires_grad_()
    y64 = None if y is None else y.detach().double().requires_grad_()
    d64 = ref.pairwise_euclidean(x64, y64)
    (d64 * g.double()).sum().backward()
    torch.testing.assert_close(d.double(), d64.detach(), rtol=1e-5, atol=1e-5 * d64.max().item())
    tol = tol32 if dtype == torch.float32 else GRAD_TOL[dtype]
    for got, want in ((xg, x64), (yg, y64)):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol * want.grad.abs().max().item())


@pytest.mark.parametrize("n,m,d", [(4, 6, 3), (6, 6, 129), (64, 40, 129), (130, 4, 3)])
@pytest.mark.parametrize("self_matrix", [True, False])
def test_fp32_matches_reference(n, m, d, self_matrix, gen, device, tol):
    x = torch.randn(n, d, generator=gen)
    _check(x, None if self_matrix else torch.randn(m, d, generator=gen), gen, device, tol.grad)


@pytest.mark.slow
@pytest.mark.parametrize("n,d", [(64, 2048), (130, 2048)])
def test_fp32_matches_reference_large(n, d, gen, device, tol):
    x = torch.randn(n, d, generator=gen).abs() * 1.5  # values like pooled features; d ~ 60
    _check(x, None, gen, device, tol.grad)
    _check(x[: n // 2], torch.randn(n, d, generator=gen), gen, device, tol.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_match_reference(dtype, gen, device, tol):
    _check(torch.randn(40, 70, generator=gen).to(dtype), None, gen, device, tol.grad)
    y = torch.randn(20, 70, generator=gen).to(dtype)
    _check(torch.randn(40, 70, generator=gen).to(dtype), y, gen, device, tol.grad)


def test_diagonal_is_exact_for_large_norms(gen, device, tol):
    """Self-distance diagonal is exactly sqrt(1e-12): the formula's rounding noise (|x|^2 ~ 2e3 at
    D = 2048 leaves up to ~0.03 in d2, i.e. ~0.16 after the sqrt) must not reach it."""
    x = torch.randn(24, 2048, generator=gen)
    d = triton_ops.pairwise_euclidean(x.to(device)).cpu()
    assert torch.all(d.diagonal() == FLOOR)
    off = ~torch.eye(24, dtype=torch.bool)
    d64 = ref.pairwise_euclidean(x.double())
    torch.testing.assert_close(d[off].double(), d64[off], rtol=1e-5, atol=1e-5 * d64.max().item())


def test_exact_duplicates_are_clamped_with_zero_gradient(gen, device, tol):
    """Small-integer rows are exact in float32: a duplicated row sits at sqrt(1e-12), no gradient."""
    x = torch.randint(-4, 5, (20, 64), generator=gen).float()
    x[5] = x[2]
    xg = x.to(device, copy=True).requires_grad_()
    d = triton_ops.pairwise_euclidean(xg)
    assert d[2, 5].item() == d[5, 2].item() == FLOOR
    mask = torch.zeros_like(d)
    mask[2, 5] = mask[5, 2] = 1.0  # only the duplicate pair feeds the loss: clamped, so no gradient
    (d * mask).sum().backward()
    assert torch.count_nonzero(xg.grad) == 0


def test_expanded_upstream_gradient_and_dispatch(gen, device, tol):
    """``d.sum().backward()`` hands the kernel a stride-0 gradient."""
    x = torch.randn(33, 20, generator=gen)
    xg, x64 = x.to(device, copy=True).requires_grad_(), x.double().requires_grad_()
    losses.pairwise_euclidean(xg, backend="triton").sum().backward()
    ref.pairwise_euclidean(x64).sum().backward()
    torch.testing.assert_close(xg.grad.cpu().double(), x64.grad, rtol=tol.grad, atol=tol.grad * x64.grad.abs().max().item())


def test_non_contiguous_inputs(gen, device, tol):
    x = torch.randn(31, 50, generator=gen).t()
    y = torch.randn(31, 70, generator=gen).t()[::2]
    assert not x.is_contiguous() and not y.is_contiguous()
    _check(x, y, gen, device, tol.grad)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="x has 5 columns but y has 4"):
        triton_ops.pairwise_euclidean(torch.randn(3, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="y must be 2-D"):
        triton_ops.pairwise_euclidean(torch.randn(3, 5), torch.randn(5))
    with pytest.raises(TypeError, match="float64"):
        triton_ops.pairwise_euclidean(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        triton_ops.pairwise_euclidean([[1.0, 2.0]])


def test_cuda_block_sizes_under_the_interpreter(gen, monkeypatch, device, tol):
    """The tile sizes the CUDA launchers use (64 x 64 x 32) give the same results."""
    from fastmmt.kernels import distance

    monkeypatch.setattr(distance, "INTERPRETER_BLOCKS", distance.CUDA_BLOCKS)
    _check(torch.randn(70, 40, generator=gen), None, gen, device, tol.grad)
    _check(torch.randn(70, 40, generator=gen), torch.randn(65, 40, generator=gen), gen, device, tol.grad)


_OFFSETS_SCRIPT = r"""
import os, sys, tempfile, torch
from fastmmt.kernels import distance
from fastmmt.ops import reference as ref
S, N, D = 2**30 + 1, 3, 5  # row 2 starts 2^31 + 2 elements in: an int32 offset wraps around
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "sparse.bin")
    size = (N - 1) * S + D + N  # room for both views below
    with open(path, "wb") as f:
        f.truncate(size * 4)  # a sparse file: 8 GB of address space, three pages touched
    big = torch.from_file(path, shared=True, size=size, dtype=torch.float32)
    x = big.as_strided((N, D), (S, 1))
    gen = torch.Generator().manual_seed(0)
    x.copy_(torch.randn(N, D, generator=gen))
    x64 = x.clone().double().requires_grad_()
    d64 = ref.pairwise_euclidean(x64)
    torch.testing.assert_close(distance.pairwise_forward(x, None).double(), d64.detach(), rtol=1e-5, atol=1e-6)
    # the gradient read through a (N x N) strided view of the same mapping: sg0 = 2^30 + 1
    g = big.as_strided((N, N), (S, 1), storage_offset=D)
    g.copy_(torch.randn(N, N, generator=gen))
    (d64 * g.double()).sum().backward()
    dist = distance.pairwise_forward(x.clone(), None)
    got = distance.pairwise_backward(g, dist, x, x, self_matrix=True)
    torch.testing.assert_close(got.double(), x64.grad, rtol=1e-4, atol=1e-5)
print("ok")
"""


def test_int64_offsets_past_2_31_with_a_strided_view():
    """Rows 2^30 + 1 elements apart (a strided view of a sparse file, not an 8 GB allocation):
    offsets past 2^31 must address the right rows, forward and backward. Run in a subprocess
    under the interpreter: int32 offsets wrap and the bad read crashes the process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _OFFSETS_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])


def test_backward_tiles_chosen_by_shared_memory(gen, device, tol, monkeypatch):
    """sm_86/89 (99 KB per block) get the smaller backward tile, sm_80/90 the large one; the small
    tile computes the same gradient (under the interpreter on CPU)."""
    from fastmmt.kernels import distance

    cuda = torch.device("cuda", 0)
    assert distance.bwd_block_sizes(cuda, limit=101376) == (64, 32, 32)   # sm_86 / sm_89
    assert distance.bwd_block_sizes(cuda, limit=166912) == (64, 64, 32)   # sm_80
    assert distance.bwd_block_sizes(cuda, limit=232448) == (64, 64, 32)   # sm_90
    assert distance.bwd_block_sizes(torch.device("cpu")) == distance.INTERPRETER_BLOCKS
    if device.type == "cuda":
        limit = distance.shared_memory_limit(torch.cuda.current_device())
        assert next(need for b, need in distance.CUDA_BWD_BLOCKS if b == distance.bwd_block_sizes(device)) <= limit
    monkeypatch.setattr(distance, "bwd_block_sizes", lambda dev, limit=None: (64, 32, 32))
    _check(torch.randn(70, 40, generator=gen), None, gen, device, tol.grad)
    _check(torch.randn(70, 40, generator=gen), torch.randn(65, 40, generator=gen), gen, device, tol.grad)


_SHARED_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmmt.kernels import distance
sig = dict(g_ptr="*fp32", d_ptr="*fp32", a_ptr="*fp32", b_ptr="*fp32", out_ptr="*fp32", NA="i32", NB="i32",
           D="i32", sg0="i32", sg1="i32", sd0="i32", sd1="i32", stride_a="i32", stride_b="i32", stride_o="i32")
out = []
for (bm, bn, bd), need in distance.CUDA_BWD_BLOCKS:
    consts = {"SELF": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
    src = ASTSource(fn=distance._pairwise_bwd, signature={**sig, **{k: "constexpr" for k in consts}},
                    constexprs=consts)
    out.append([need, triton.compile(src, target=GPUTarget("cuda", 86, 32)).metadata.shared])
print(json.dumps(out))
"""


def test_backward_tile_shared_memory_figures_match_the_compiler():
    """The shared memory CUDA_BWD_BLOCKS claims per tile is what Triton compiles for sm_86
    (float32, the most of any dtype): the tile choice cannot pick one that fails to launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SHARED_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(0 < compiled <= claimed for claimed, compiled in pairs), pairs
    assert pairs[-1][1] <= 101376  # the fallback tile fits sm_86/sm_89
