"""ClusterMemory (Cluster Contrast): one training step (forward + backward + ordered update) and the
update alone, fastmmt against the transcription of the original, in the same run.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/bench_cluster_memory.py -q \
         --benchmark-columns=min,median,rounds --benchmark-json=bench/results/cluster_memory.json
Shape: B 256 (16 clusters x 16 samples, Cluster Contrast's sampler), D 2048, 800 clusters, float32.
Variants: ``torch`` (fastmmt's torch backend: update in rounds) everywhere; ``triton`` (fused kernels)
on CUDA only (the CPU interpreter is a correctness tool); ``ext`` (the torch loss with the update in
the compiled extension ``fastmmt._C``) on CPU when it is built. ``extra_info`` holds the medians of
alternating calls of the original and the variant and their ratio (``speedup_median``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _memory_common import BACKENDS, DEVICE, NAMES, memory_reference, record
from fastmmt.ops import cluster_memory_loss
from fastmmt.ops.memory import _ext, ordered_update_torch_

B, D, K, PER_CLUSTER = 256, 2048, 800, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # see bench/conftest.py


def _inputs():
    g = torch.Generator().manual_seed(0)
    mem = F.normalize(torch.randn(K, D, generator=g), dim=1).to(DEVICE)
    clusters = torch.randperm(K, generator=g)[:B // PER_CLUSTER]
    targets = clusters.repeat_interleave(PER_CLUSTER)[torch.randperm(B, generator=g)].to(DEVICE)
    x = torch.randn(B, D, generator=g).to(DEVICE).requires_grad_()
    return mem, targets, x


def _step(fn, mem, targets, x):
    def run():
        x.grad = None
        fn(x, targets, mem).backward()
    return run


def test_variants_agree():
    """One step of each variant gives the same loss and memory (like is timed against like)."""
    for hard in (False, True):
        mem, targets, x = _inputs()
        mem2 = mem.clone()
        a = memory_reference.cluster_memory_ref(x, targets, mem, use_hard=hard)
        a.backward()
        for backend in NAMES:
            m = mem2.clone()
            b = cluster_memory_loss(x, targets, m, use_hard=hard, backend=backend)
            b.backward()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mem, m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_hard", [False, True], ids=["ordered", "hard"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step(benchmark, backend, use_hard):
    mem, targets, x = _inputs()
    ref = _step(lambda x, t, m: memory_reference.cluster_memory_ref(x, t, m, use_hard=use_hard), mem, targets, x)
    var = _step(lambda x, t, m: cluster_memory_loss(x, t, m, use_hard=use_hard, backend=backend), mem, targets, x)
    record(benchmark, f"ClusterMemory step B={B} D={D} K={K} hard={use_hard}", ref, var)


@pytest.mark.parametrize("use_hard", [False, True], ids=["ordered", "hard"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_update(benchmark, backend, use_hard):
    mem, targets, x = _inputs()
    xn = F.normalize(x.detach(), dim=1)
    ref_update = memory_reference.cm_hard_update_ref if use_hard else memory_reference.cm_update_ref
    if backend == "triton":
        from fastmmt.kernels.memory import ordered_update_
        ones = torch.ones(B, device=DEVICE)
        var = lambda: ordered_update_(mem, xn, ones, targets, 0.2, use_hard)  # noqa: E731
    elif backend == "ext":
        var = lambda: _ext().memory_ordered_update_(mem, xn, targets, 0.2, use_hard)  # noqa: E731
    else:
        var = lambda: ordered_update_torch_(mem, xn, targets, 0.2, use_hard)  # noqa: E731
    record(benchmark, f"ClusterMemory update B={B} D={D} K={K} hard={use_hard}",
           lambda: ref_update(mem, xn, targets, 0.2), var)
