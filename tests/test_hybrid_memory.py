"""HybridMemory (SpCL) on every update backend (torch, triton, ext: the extension's CPU update)
against the float64 transcription of the original (tests/memory_reference.py): loss, input
gradient (also against plain float64 autograd at the memory before the step) and the memory after
several ordered updates by index. Inputs are fresh
random each run (the seed is printed; FASTMMT_TEST_SEED pins it).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmmt.ops import HybridMemory, hybrid_memory_loss
from memory_backends import BACKENDS, LOSS_TOL, MEM_TOL, assert_step_matches_reference, device_for
from memory_reference import hybrid_memory_ref

D, N_SOURCE, N_TARGET = 24, 5, 30
N = N_SOURCE + N_TARGET


def _labels(gen: torch.Generator) -> torch.Tensor:
    """SpCL's layout: source classes 0..4 (one centroid row each), then target images with pseudo
    labels offset by 5; label values with no row are left out (empty slots), several rows share one."""
    target = torch.randint(0, 12, (N_TARGET,), generator=gen) * 2 + N_SOURCE  # odd offsets never used
    return torch.cat([torch.arange(N_SOURCE), target])


INDEXES = {
    "source repeats + targets": [0, 0, 3, 7, 9, 0, 3, 12, 33, 20],
    "targets once": [5, 6, 7, 8, 30, 34],
    "one source row": [2, 2, 2, 2],
}


def _check(indexes_list, gen, device, backend, n_steps=3, dtype=torch.float32, noncontig=False):
    labels = _labels(gen)
    mem = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(device)
    mem64 = mem.double().cpu()
    indexes = torch.tensor(indexes_list)
    for _ in range(n_steps):
        big = F.normalize(torch.randn(len(indexes), 2 * D, generator=gen), dim=1).to(dtype)
        x = big[:, ::2] if noncontig else big[:, :D].contiguous()
        x64 = x.double().requires_grad_()
        xg = x.double().requires_grad_()
        plain = hybrid_memory_ref(xg, indexes, mem64.clone(), labels)
        (gref,) = torch.autograd.grad(plain, xg)  # the update runs in a backward; this one has none
        ref = hybrid_memory_ref(x64, indexes, mem64, labels)
        ref.backward()
        xd = (big.to(device)[:, ::2] if noncontig else x.to(device)).detach().requires_grad_()
        loss = hybrid_memory_loss(xd, indexes.to(device), mem, labels.to(device), backend=backend)
        loss.backward()
        assert_step_matches_reference(loss, xd.grad, mem, dtype, ref, gref, mem64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INDEXES))
def test_steps_match_transcription(case, backend, gen, device):
    _check(INDEXES[case], gen, device_for(backend, device), backend)


def test_one_slot_per_row_as_on_cuda(monkeypatch, gen, device):
    """On CUDA the labels are summed into one slot per memory row (no host read of labels.max());
    the extra, empty slots must not change the result."""
    from fastmmt.ops import memory

    monkeypatch.setattr(memory, "_label_slots", lambda labels, n: n)
    _check(INDEXES["source repeats + targets"], gen, device, "torch", n_steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_half_inputs(backend, gen, device):
    device = device_for(backend, device)
    _check(INDEXES["source repeats + targets"], gen, device, backend, n_steps=2, noncontig=True)
    _check(INDEXES["source repeats + targets"], gen, device, backend, n_steps=2, dtype=torch.float16)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32(amp, gen, device):
    """Under autocast the result equals float32's: e^(1/temp) = e^20 would overflow fp16."""
    labels = _labels(gen).to(device)
    mem0 = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(device)
    x = F.normalize(torch.randn(6, D, generator=gen), dim=1).to(device)
    idx = torch.tensor(INDEXES["targets once"], device=device)
    out = []
    for enabled in (False, True):
        mem, xd = mem0.clone(), x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=amp, enabled=enabled):
            loss = hybrid_memory_loss(xd, idx, mem, labels)
        loss.backward()
        out.append((loss.detach(), xd.grad, mem))
    (l0, g0, m0), (l1, g1, m1) = out
    assert l1.dtype == torch.float32 and torch.isfinite(l1)
    assert torch.allclose(l0, l1, rtol=1e-6) and torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(m0, m1, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_transcription(backend, gen, device):
    """The nn.Module with SpCL's constructor and buffers, filled the way SpCL's script does."""
    device = device_for(backend, device)
    model = HybridMemory(D, N, temp=0.05, momentum=0.2, backend=backend).to(device)
    labels = _labels(gen)
    model.features = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(device)
    model.labels = labels.to(device)
    mem64 = model.features.double().cpu()
    indexes = torch.tensor(INDEXES["source repeats + targets"])
    for _ in range(2):
        x = F.normalize(torch.randn(len(indexes), D, generator=gen), dim=1)
        x64 = x.double().requires_grad_()
        ref = hybrid_memory_ref(x64, indexes, mem64, labels)
        ref.backward()
        loss = model(x.to(device).requires_grad_(), indexes.to(device))
        loss.backward()
        assert torch.allclose(loss.double().cpu(), ref.detach(), rtol=LOSS_TOL)
        assert (model.features.double().cpu() - mem64).abs().max() < MEM_TOL


def test_bad_labels_error(gen):
    x, idx, mem = torch.randn(2, D, generator=gen), torch.tensor([0, 1]), torch.zeros(N, D)
    with pytest.raises(ValueError, match="one entry per memory row"):
        hybrid_memory_loss(x, idx, mem, torch.zeros(N - 1, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="features but the memory"):
        hybrid_memory_loss(x[:, :3], idx, mem, torch.zeros(N, dtype=torch.long), backend="torch")


@pytest.mark.gpu
def test_cuda_triton_update_reads_nothing_on_the_host(gen, device):
    labels = torch.cat([torch.arange(50), torch.randint(0, 100, (500,), generator=gen) + 50]).to(device)
    mem = F.normalize(torch.randn(550, 128, generator=gen), dim=1).to(device)
    x = F.normalize(torch.randn(64, 128, generator=gen), dim=1).to(device).requires_grad_()
    idx = torch.randint(0, 550, (64,), generator=gen).to(device)
    hybrid_memory_loss(x, idx, mem, labels).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hybrid_memory_loss(x, idx, mem, labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
