"""HybridMemory (SpCL): one training step (forward + backward + ordered update by index) at SpCL's
UDA shape, fastmmt against the transcription of the original, in the same run.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/bench_hybrid_memory.py -q \
         --benchmark-columns=min,median,rounds --benchmark-json=bench/results/hybrid_memory.json
Shape: B 64 source + 64 target, D 2048, memory = 700 source class centroids + 12,936 target
images (Market-1501), the target rows carrying 500 pseudo labels plus outliers with their own.
Variants: ``torch`` everywhere (update in rounds); ``triton`` (update kernel) on CUDA only; ``ext``
(the update in the compiled extension ``fastmmt._C``) on CPU when it is built.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _memory_common import BACKENDS, DEVICE, NAMES, memory_reference, record
from fastmmt.ops import hybrid_memory_loss

B_SRC, B_TGT, D, N_SRC, N_TGT = 64, 64, 2048, 700, 12_936


pytestmark = pytest.mark.usefixtures("one_thread")  # see bench/conftest.py


def _inputs():
    g = torch.Generator().manual_seed(0)
    n = N_SRC + N_TGT
    mem = F.normalize(torch.randn(n, D, generator=g), dim=1).to(DEVICE)
    pseudo = torch.randint(0, 500, (N_TGT,), generator=g)
    outlier = torch.rand(N_TGT, generator=g) < 0.2
    pseudo = torch.where(outlier, 500 + torch.cumsum(outlier, 0) - 1, pseudo)  # outliers: one label each, as SpCL
    labels = torch.cat([torch.arange(N_SRC), N_SRC + pseudo]).to(DEVICE)
    src = torch.randperm(N_SRC, generator=g)[:16].repeat_interleave(4)  # 16 classes x 4 images
    tgt = N_SRC + torch.randperm(N_TGT, generator=g)[:B_TGT]
    indexes = torch.cat([src, tgt]).to(DEVICE)
    x = F.normalize(torch.randn(B_SRC + B_TGT, D, generator=g), dim=1).to(DEVICE).requires_grad_()
    return mem, labels, indexes, x


def _step(fn, x, indexes, mem, labels):
    def run():
        x.grad = None
        fn(x, indexes, mem, labels).backward()
    return run


def test_variants_agree():
    mem, labels, indexes, x = _inputs()
    mem2 = mem.clone()
    a = memory_reference.hybrid_memory_ref(x, indexes, mem, labels)
    a.backward()
    for backend in NAMES:
        m = mem2.clone()
        b = hybrid_memory_loss(x, indexes, m, labels, backend=backend)
        b.backward()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mem, m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step(benchmark, backend):
    mem, labels, indexes, x = _inputs()
    ref = _step(memory_reference.hybrid_memory_ref, x, indexes, mem, labels)
    var = _step(lambda *a: hybrid_memory_loss(*a, backend=backend), x, indexes, mem, labels)
    record(benchmark, f"HybridMemory step B={B_SRC}+{B_TGT} D={D} N={N_SRC}+{N_TGT}", ref, var)
