"""ClusterMemory (Cluster Contrast) on every backend against the float64 transcription of the
original (tests/memory_reference.py): loss, input gradient and the memory after several ordered
updates. The Triton backend runs on ``device`` (compiled on CUDA, interpreted on CPU), the ext
backend (the extension's update) on CPU. The gradient
reference is plain autograd of ``cross_entropy(normalize(x) M^T / temp)`` in float64 with M as it
was before the step. Inputs are fresh random each run (the seed is printed; FASTMMT_TEST_SEED pins it).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmmt.ops import ClusterMemory, cluster_memory_loss
from memory_backends import (BACKENDS, EXT_BUILT, EXT_SKIP, FLOAT64_BACKENDS, GRAD_TOL, LOSS_TOL, MEM_TOL,
                             assert_step_matches_reference, device_for)
from memory_reference import cluster_memory_ref, cm_hard_update_ref, cm_update_ref

D, K = 40, 37  # D is not a multiple of the D block; K spans two memory blocks under the interpreter

CASES = {
    "repeated clusters": [3, 3, 7, 1, 3, 7, 0, 9, 3, 1],
    "each cluster once": [5, 2, 8, 11, 0, 30],
    "all one cluster": [4] * 9,
    "empty rows hit": [36, 35, 36, 2, 35],  # rows 35, 36 start as zero vectors
}


def _memory(gen: torch.Generator) -> torch.Tensor:
    mem = F.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1)
    mem[K - 4:] = 0.0  # never-filled rows (empty clusters): logits 0, and an update from zero
    return mem


def _steps(targets_list, gen, device, backend, use_hard, dtype=torch.float32, n_steps=3, noncontig=False):
    """``n_steps`` training steps of ours and of the reference on the same inputs; compares each."""
    targets = torch.tensor(targets_list)
    mem64 = _memory(gen)
    mem = mem64.to(torch.float32).to(device)
    mem64 = mem.double().cpu()  # the reference starts from the same float32 values
    temp, momentum = 0.05, 0.2
    for _ in range(n_steps):
        big = torch.randn(len(targets), 2 * D, generator=gen).to(dtype)
        x = big[:, ::2] if noncontig else big[:, :D].contiguous()
        x64 = x.double().requires_grad_()
        ref = cluster_memory_ref(x64, targets, mem64, temp, momentum, use_hard)
        # independent gradient: plain autograd at the memory before the update
        xg = x.double().requires_grad_()
        ref_before = F.cross_entropy(F.normalize(xg, dim=1) @ mem64.t() / temp, targets)
        (gref,) = torch.autograd.grad(ref_before, xg)
        ref.backward()
        xd = x.to(device).detach().requires_grad_()
        if noncontig:
            xd = big.to(device)[:, ::2].detach().requires_grad_()
        loss = cluster_memory_loss(xd, targets.to(device), mem, temp, momentum, use_hard, backend=backend)
        loss.backward()
        assert_step_matches_reference(loss, xd.grad, mem, dtype, ref, gref, mem64)
        assert torch.allclose(x64.grad, gref, rtol=1e-10, atol=1e-12)  # the transcription's own gradient
    return mem, mem64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_hard", [False, True], ids=["ordered", "hard"])
@pytest.mark.parametrize("case", list(CASES))
def test_steps_match_transcription(case, use_hard, backend, gen, device):
    _steps(CASES[case], gen, device_for(backend, device), backend, use_hard)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_half_inputs(backend, gen, device):
    device = device_for(backend, device)
    _steps(CASES["repeated clusters"], gen, device, backend, False, noncontig=True, n_steps=2)
    _steps(CASES["repeated clusters"], gen, device, backend, True, dtype=torch.bfloat16, n_steps=2)


@pytest.mark.parametrize("use_hard", [False, True], ids=["ordered", "hard"])
def test_several_row_and_feature_blocks(use_hard, gen, device):
    """B 21 and D 100 span two row blocks and two feature blocks of the interpreter's tiles (the
    cases above fit one): the backward's (row, D) grid and the update's full-row registers."""
    b, d, k = 21, 100, 37
    mem = F.normalize(torch.randn(k, d, generator=gen), dim=1).to(device)
    mem64 = mem.double().cpu()
    targets = torch.randint(0, 6, (b,), generator=gen) * 5
    for _ in range(2):
        x = torch.randn(b, d, generator=gen)
        x64 = x.double().requires_grad_()
        xg = x.double().requires_grad_()
        (gref,) = torch.autograd.grad(F.cross_entropy(F.normalize(xg, dim=1) @ mem64.t() / 0.05, targets), xg)
        ref = cluster_memory_ref(x64, targets, mem64, use_hard=use_hard)
        ref.backward()
        xd = x.to(device).requires_grad_()
        loss = cluster_memory_loss(xd, targets.to(device), mem, use_hard=use_hard, backend="triton")
        loss.backward()
        assert torch.allclose(loss.double().cpu(), ref.detach(), rtol=LOSS_TOL)
        assert (xd.grad.double().cpu() - gref).abs().max() / gref.abs().max() < GRAD_TOL
        assert (mem.double().cpu() - mem64).abs().max() < MEM_TOL


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("use_hard", [False, True], ids=["ordered", "hard"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_memory_stays_float64(case, use_hard, backend, gen):
    """A float64 memory is updated in float64 (1e-12 of the transcription: a float32 update would
    be ~1e-7 off), loss and memory both float64."""
    targets = torch.tensor(CASES[case])
    mem = _memory(gen)
    mem64 = mem.clone()
    for _ in range(3):
        x = torch.randn(len(targets), D, generator=gen, dtype=torch.float64)
        ref = cluster_memory_ref(x.clone().requires_grad_(), targets, mem64, use_hard=use_hard)
        ref.backward()
        loss = cluster_memory_loss(x.clone().requires_grad_(), targets, mem, use_hard=use_hard, backend=backend)
        loss.backward()
        assert loss.dtype == torch.float64 and mem.dtype == torch.float64
        assert torch.allclose(loss, ref.detach(), rtol=1e-12, atol=0)
        assert (mem - mem64).abs().max() < 1e-12


@pytest.mark.skipif(not EXT_BUILT, reason=EXT_SKIP)
@pytest.mark.parametrize("use_hard", [False, True], ids=["ordered", "hard"])
def test_ext_rows_in_parallel_match_transcription(use_hard, gen):
    """Two threads, enough rows and features for at::parallel_for to split the rows across them:
    each row still sees its samples in batch order (and hard its least similar one)."""
    from fastmmt.ops.memory import _ext

    b, d, k = 96, 1024, 50
    mem = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    mem64 = mem.double()
    targets = torch.randint(0, 12, (b,), generator=gen) * 4
    x = F.normalize(torch.randn(b, d, generator=gen), dim=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _ext().memory_ordered_update_(mem, x, targets, 0.2, use_hard)
    finally:
        torch.set_num_threads(before)
    (cm_hard_update_ref if use_hard else cm_update_ref)(mem64, x.double(), targets, 0.2)
    assert (mem.double() - mem64).abs().max() < MEM_TOL


@pytest.mark.skipif(not EXT_BUILT, reason=EXT_SKIP)
def test_auto_picks_ext_on_cpu(monkeypatch, gen):
    """On CPU tensors with the extension built, ``auto`` runs the update in the extension (even
    under the Triton interpreter the tests switch on)."""
    from types import SimpleNamespace

    from fastmmt.ops import memory

    real = memory._ext()
    calls = []

    def spy(*args):
        calls.append(args[-1])
        real.memory_ordered_update_(*args)

    monkeypatch.setattr(memory, "_ext", lambda: SimpleNamespace(memory_ordered_update_=spy))
    targets = torch.tensor(CASES["repeated clusters"])
    mem = _memory(gen).to(torch.float32)
    mem64 = mem.double()
    for hard in (False, True):
        x = torch.randn(len(targets), D, generator=gen)
        cluster_memory_ref(x.double().requires_grad_(), targets, mem64, use_hard=hard).backward()
        cluster_memory_loss(x.requires_grad_(), targets, mem, use_hard=hard).backward()
    assert calls == [False, True]
    assert (mem.double() - mem64).abs().max() < MEM_TOL


def test_ext_not_built_is_a_clear_error_and_auto_falls_back(monkeypatch, gen):
    from fastmmt.ops import memory

    monkeypatch.setattr(memory, "_ext", lambda: None)
    targets = torch.tensor([0, 1, 1])
    mem = F.normalize(torch.randn(K, D, generator=gen), dim=1)
    x = torch.randn(3, D, generator=gen)
    with pytest.raises(RuntimeError, match="fastmmt._C is not built with the memory update"):
        cluster_memory_loss(x, targets, mem.clone(), backend="ext")
    mem64 = mem.double()
    cluster_memory_ref(x.double().requires_grad_(), targets, mem64).backward()
    cluster_memory_loss(x.requires_grad_(), targets, mem).backward()  # auto: as without the extension
    assert (mem.double() - mem64).abs().max() < MEM_TOL


@pytest.mark.skipif(not EXT_BUILT, reason=EXT_SKIP)
def test_ext_refuses_tensors_off_the_cpu(gen):
    """The ext backend is CPU-only: another device (meta here; CUDA in the gpu test below) is a clear
    error, from the Python dispatch and from the extension itself."""
    from fastmmt.ops.memory import _ext

    mem = torch.empty(K, D, device="meta")
    x = torch.empty(3, D, device="meta")
    t = torch.zeros(3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="the ext backend runs on CPU tensors"):
        cluster_memory_loss(x, t, mem, backend="ext")
    with pytest.raises(ValueError, match="the ext backend runs on CPU tensors"):
        _ext().memory_ordered_update_(mem, x, t, 0.2, False)


@pytest.mark.skipif(not EXT_BUILT, reason=EXT_SKIP)
@pytest.mark.parametrize("bad, err, match", [
    (lambda m, x, t: (m, x, torch.tensor([0, K, 1])), IndexError, r"index 37 of sample 1 is outside the memory's rows \[0, 37\)"),
    (lambda m, x, t: (m, x, torch.tensor([0, -1, 1])), IndexError, "outside the memory's rows"),
    (lambda m, x, t: (m, x, t.int()), ValueError, "int64 vector of 3 entries"),
    (lambda m, x, t: (m, x[:, :5], t), ValueError, "do not match the memory's 40 features"),
    (lambda m, x, t: (m.half(), x, t), ValueError, "float32 or float64"),
    (lambda m, x, t: (torch.zeros(K, 2 * D)[:, ::2], x, t), ValueError, "contiguous rows"),
])
def test_ext_bad_input_writes_nothing(bad, err, match, gen):
    """The extension checks everything (index range included) before it writes any row."""
    from fastmmt.ops.memory import _ext

    mem = F.normalize(torch.randn(K, D, generator=gen), dim=1)
    x, t = torch.randn(3, D, generator=gen), torch.tensor([0, 1, 1])
    m, xb, tb = bad(mem, x, t)
    before = m.clone()
    with pytest.raises(err, match=match):
        _ext().memory_ordered_update_(m, xb, tb, 0.2, False)
    assert torch.equal(m, before)


@pytest.mark.gpu
def test_cuda_ext_is_a_clear_error_and_auto_runs_triton(gen, device):
    mem = F.normalize(torch.randn(K, D, generator=gen), dim=1).to(device)
    x = torch.randn(3, D, generator=gen).to(device)
    t = torch.tensor([0, 1, 1], device=device)
    if EXT_BUILT:
        with pytest.raises(ValueError, match="the ext backend runs on CPU tensors"):
            cluster_memory_loss(x, t, mem, backend="ext")
    mem64 = mem.double().cpu()
    cluster_memory_ref(x.double().cpu().requires_grad_(), t.cpu(), mem64).backward()
    cluster_memory_loss(x.requires_grad_(), t, mem).backward()
    assert (mem.double().cpu() - mem64).abs().max() < MEM_TOL


def test_update_order_matters(gen):
    """The ordered update differs from applying the same samples in another order: a check that
    the comparison above can see a wrong order."""
    mem = F.normalize(torch.randn(3, D, generator=gen, dtype=torch.float64), dim=1)
    x = F.normalize(torch.randn(4, D, generator=gen, dtype=torch.float64), dim=1)
    a, b = mem.clone(), mem.clone()
    from fastmmt.ops.memory import ordered_update_torch_
    ordered_update_torch_(a, x, torch.tensor([1, 1, 1, 1]), 0.2)
    ordered_update_torch_(b, x.flip(0), torch.tensor([1, 1, 1, 1]), 0.2)
    assert (a[1] - b[1]).abs().max() > 1e-3
    assert torch.equal(a[0], mem[0]) and torch.equal(a[2], mem[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32(amp, backend, gen, device):
    """Under autocast the loss, gradient and update equal the float32 results (e^(1/temp) = e^20
    overflows fp16, and a bf16 x M^T would be off by ~1e-2)."""
    device = device_for(backend, device)
    targets = torch.tensor(CASES["repeated clusters"], device=device)
    mem0 = F.normalize(torch.randn(K, D, generator=gen), dim=1).to(device)
    x = torch.randn(len(targets), D, generator=gen).to(device)
    out = []
    for enabled in (False, True):
        mem = mem0.clone()
        xd = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=amp, enabled=enabled):
            loss = cluster_memory_loss(xd, targets, mem, backend=backend)
        loss.backward()
        out.append((loss.detach(), xd.grad, mem))
    (l0, g0, m0), (l1, g1, m1) = out
    assert l1.dtype == torch.float32
    assert torch.allclose(l0, l1, rtol=1e-6) and torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(m0, m1, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_transcription(backend, gen, device):
    """The nn.Module: the original's constructor, buffer and call; two steps like a training loop."""
    device = device_for(backend, device)
    model = ClusterMemory(D, K, temp=0.05, momentum=0.2, use_hard=False, backend=backend).to(device)
    model.features = _memory(gen).to(torch.float32).to(device)
    mem64 = model.features.double().cpu()
    targets = torch.tensor(CASES["repeated clusters"])
    for _ in range(2):
        x = torch.randn(len(targets), D, generator=gen)
        x64 = x.double().requires_grad_()
        ref = cluster_memory_ref(x64, targets, mem64)
        ref.backward()
        xd = x.to(device).requires_grad_()
        loss = model(xd, targets.to(device))
        loss.backward()
        assert torch.allclose(loss.double().cpu(), ref.detach(), rtol=LOSS_TOL)
        assert (model.features.double().cpu() - mem64).abs().max() < MEM_TOL


def test_forward_without_backward_leaves_memory(gen, device):
    """As in the original, the update runs in the backward: evaluation does not move the memory."""
    mem = F.normalize(torch.randn(K, D, generator=gen), dim=1).to(device)
    before = mem.clone()
    with torch.no_grad():
        cluster_memory_loss(torch.randn(4, D, generator=gen).to(device), torch.tensor([0, 1, 1, 2], device=device), mem)
    assert torch.equal(mem, before)


def test_triton_out_of_range_target_is_nan_and_updates_nothing(gen, device):
    mem = F.normalize(torch.randn(K, D, generator=gen), dim=1).to(device)
    before = mem.clone()
    x = torch.randn(3, D, generator=gen).to(device).requires_grad_()
    loss = cluster_memory_loss(x, torch.tensor([0, K, 0], device=device), mem, backend="triton")
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(mem[1:], before[1:]) and not torch.equal(mem[0], before[0])


@pytest.mark.parametrize("bad, match", [
    (lambda x, t, m: (x[0], t, m), "2-D tensor"),
    (lambda x, t, m: (x[:, :5], t, m), "features but the memory"),
    (lambda x, t, m: (x, t[:2], m), "one per input row"),
    (lambda x, t, m: (x, t.int(), m), "int64"),
    (lambda x, t, m: (x, t, m.half()), "float32 or float64"),
])
def test_bad_input_errors(bad, match, gen):
    x, t, m = torch.randn(3, D, generator=gen), torch.tensor([0, 1, 1]), torch.zeros(K, D)
    with pytest.raises((ValueError, TypeError), match=match):
        cluster_memory_loss(*bad(x, t, m), backend="torch")


@pytest.mark.gpu
def test_cuda_triton_reads_nothing_on_the_host(gen, device):
    """Forward, backward and update of the Triton backend never synchronise with the host."""
    mem = F.normalize(torch.randn(800, 256, generator=gen), dim=1).to(device)
    x = torch.randn(64, 256, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 800, (64,), generator=gen).to(device)
    for hard in (False, True):
        cluster_memory_loss(x, t, mem, use_hard=hard).backward()  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cluster_memory_loss(x, t, mem, use_hard=hard).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_memory_kernels_compile_for_sm90():
    """The GPU path (no GPU here) is at least built: kernels/aot.py's real Triton compiler turns the
    three memory kernels into sm_90 cubins, in a process without the interpreter."""
    from aot_compile import compile_for_sm90

    names = ("cluster_memory_fwd", "cluster_memory_bwd", "ordered_update[hard=False]", "ordered_update[hard=True]")
    sizes = compile_for_sm90(names, timeout=600)
    assert sorted(sizes) == sorted(f"{n}[float32]" for n in names) and all(v > 0 for v in sizes.values())
