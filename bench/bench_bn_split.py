"""Split BN (``run.bn_split``) forward + backward: the one-pass module vs the per-chunk loop,
both against plain ``nn.BatchNorm2d`` over the whole batch (the floor: the same arithmetic with one
set of statistics) measured in the same run.

Shapes: ResNet-50 BN layers at a 256x128 input, batch 64 split in chunks of 16 (the paper's 4-GPU
set-up): the stem (64 ch at 128x64), stage 1 (256 ch at 64x32) and stage 4 (2048 ch at 16x8).
``FASTMMT_BENCH_SMALL=1`` divides the spatial size by 4 for a smoke run.
``extra_info``: ``x_plain_bn`` (time / plain BN) and, for the fused module, ``speedup_vs_loop``.

Run: .venv/bin/python -m pytest bench/bench_bn_split.py -q --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch
from torch import nn

from fastmmt.models.bn_split import SplitBatchNorm

SMALL = os.environ.get("FASTMMT_BENCH_SMALL", "0") not in ("", "0")
SHAPES = [(64, 64, 128, 64), (64, 256, 64, 32), (64, 2048, 16, 8)]
if SMALL:
    SHAPES = [(b, c, max(h // 4, 2), max(w // 4, 2)) for b, c, h, w in SHAPES]
SPLIT = 16


def _step(mod: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def run():
        x.grad = None
        mod.zero_grad(set_to_none=True)
        mod(x).backward(g)
    return run


def _median(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("variant", ["fused", "loop", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_split(benchmark, shape, variant):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    bn = nn.BatchNorm2d(shape[1])
    mods = {"plain": bn, "fused": SplitBatchNorm(bn, SPLIT, fused=True), "loop": SplitBatchNorm(bn, SPLIT, fused=False)}
    plain = _median(_step(mods["plain"], x, g))
    if variant == "fused":
        benchmark.extra_info["speedup_vs_loop"] = _median(_step(mods["loop"], x, g)) / _median(_step(mods["fused"], x, g))
    benchmark.group = f"bn_split {'x'.join(map(str, shape))} split {SPLIT}"
    benchmark(_step(mods[variant], x, g))
    benchmark.extra_info["x_plain_bn"] = benchmark.stats.stats.median / plain if math.isfinite(plain) else None
