"""Shared harness of the memory-bank and re-ranking benchmarks: the transcriptions of the originals
(tests/memory_reference.py, the tests' float64 reference, here run in float32), alternating timing
and device synchronisation."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import memory_reference  # noqa: E402  (the one copy of the transcriptions)

from fastmmt.ops.memory import _ext  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The backends timed here: ext (the extension's CPU update) on CPU tensors when built.
NAMES = (["torch"] + (["triton"] if DEVICE.type == "cuda" else [])
         + (["ext"] if DEVICE.type == "cpu" and _ext() is not None else []))
BACKENDS = [pytest.param(b, id="triton_cuda" if b == "triton" else b) for b in NAMES]  # -k cuda: GPU rows


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved(run_ref, run_var, reps: int = 9) -> tuple[float, float, float, float]:
    """(median ref, median variant, min ref, min variant) in seconds from ALTERNATING calls, so a
    shared, fluctuating load hits both sides alike."""
    run_ref()
    run_var()
    t_ref, t_var = [], []
    for _ in range(reps):
        for run, times in ((run_ref, t_ref), (run_var, t_var)):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
    t_ref.sort()
    t_var.sort()
    return t_ref[reps // 2], t_var[reps // 2], t_ref[0], t_var[0]


def record(benchmark, group: str, run_ref, run_var) -> None:
    """Time ``run_var`` with pytest-benchmark, and against ``run_ref`` interleaved for the ratios."""
    benchmark.group = group

    def timed():
        run_var()
        sync()

    benchmark.pedantic(timed, rounds=7, warmup_rounds=1, iterations=1)
    med_ref, med_var, min_ref, min_var = interleaved(run_ref, run_var)
    benchmark.extra_info.update(device=str(DEVICE), original_median_s=med_ref, variant_median_s=med_var,
                                speedup_median=med_ref / med_var, speedup_min=min_ref / min_var)
