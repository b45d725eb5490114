"""Mean-teacher update of two ResNet-50 teachers (2 x 161 fp32 tensors, 2 x 25,557,032 values).

Variants: the per-parameter Python loop (``mul_``/``add_``, as the original MMT code), the
``torch._foreach_lerp_`` backend and the extension ``fastmmt._C`` (2 threads and 1 thread).
The update is memory-bound, so the same run measures memory bandwidth with a large tensor copy
(bytes read + written / time) and reports each variant against the floor
``3 x teacher bytes (read teacher, read student, write teacher) / bandwidth`` and against the
loop, both measured here in the same process (extra_info: ``x_floor``, ``speedup_vs_loop``).
A copy's destination is also read (write-allocate) but not counted, so the copy understates the
traffic a 2-read/1-write update can reach; a second probe with exactly the update's pattern, one
huge in-place ``a.add_(b)`` (counted as 3 x bytes), gives the stricter ``x_inplace_floor``.

On a CUDA machine ``test_ema_two_resnet50_teachers_cuda`` times the same update on the GPU (the
extension's kernel, ``_foreach_lerp_``, the loop and the device-alpha path) against the device's copy
bandwidth and the loop, synchronising after each call.

Run: .venv/bin/python -m pytest bench/bench_ema.py -q --benchmark-columns=min,median,mean,rounds
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from fastmmt.ops.ema import ema_update_, load_extension

ALPHA = 0.999
COPY_NUMEL = 64 << 20  # 256 MiB of fp32: well beyond the 32 MiB L3


def resnet50_parameter_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (stem, 16 bottlenecks, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,),
                       (width,), (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def _min_time(fn, rounds: int) -> float:
    fn()
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="module")
def lists():
    shapes = resnet50_parameter_shapes()
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032
    g = torch.Generator().manual_seed(0)
    teachers = [torch.randn(s, generator=g) for s in shapes + shapes]  # two teachers, one call
    students = [torch.randn(s, generator=g) for s in shapes + shapes]
    return teachers, students


@pytest.fixture(scope="module")
def refs(lists):
    """Copy bandwidth and the loop's time, measured once in this process (min of rounds)."""
    src = torch.randn(COPY_NUMEL)
    dst = torch.empty_like(src)
    t_copy = _min_time(lambda: dst.copy_(src), rounds=10)
    bandwidth = 2 * src.nbytes / t_copy
    t_add = _min_time(lambda: dst.add_(src), rounds=10)
    inplace_bandwidth = 3 * src.nbytes / t_add
    del src, dst
    teachers, students = lists
    moved = 3 * sum(t.nbytes for t in teachers)
    t_loop = _min_time(lambda: ema_update_(teachers, students, ALPHA, backend="loop"), rounds=5)
    return {"bandwidth_GBps": bandwidth / 1e9, "bytes_moved": moved, "floor_s": moved / bandwidth,
            "inplace_floor_s": moved / inplace_bandwidth, "loop_s": t_loop}


def _report(benchmark, refs, variant: str, threads: int) -> None:
    stats = benchmark.stats.stats
    benchmark.extra_info.update({
        "variant": variant,
        "threads": threads,
        "bandwidth_GBps": round(refs["bandwidth_GBps"], 2),
        "floor_ms": round(refs["floor_s"] * 1e3, 1),
        "loop_ref_ms": round(refs["loop_s"] * 1e3, 1),
        "x_floor_min": round(stats.min / refs["floor_s"], 3),
        "x_floor_median": round(stats.median / refs["floor_s"], 3),
        "inplace_floor_ms": round(refs["inplace_floor_s"] * 1e3, 1),
        "x_inplace_floor_min": round(stats.min / refs["inplace_floor_s"], 3),
        "speedup_vs_loop_min": round(refs["loop_s"] / stats.min, 2),
    })


@pytest.mark.parametrize("backend", ["loop", "foreach", "ext"])
def test_ema_two_resnet50_teachers(benchmark, lists, refs, backend):
    if backend == "ext" and load_extension() is None:
        pytest.fail("fastmmt._C is not built: run `pip install -e . --no-build-isolation`")
    teachers, students = lists
    ran = benchmark.pedantic(ema_update_, args=(teachers, students, ALPHA, backend), rounds=10,
                             warmup_rounds=1)
    assert ran == backend
    _report(benchmark, refs, backend, torch.get_num_threads())


def test_ema_ext_one_thread(benchmark, lists, refs):
    """Thread-count profile: the extension on one thread (is one core enough to saturate memory?)."""
    teachers, students = lists
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(ema_update_, args=(teachers, students, ALPHA, "ext"), rounds=10,
                           warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    _report(benchmark, refs, "ext, 1 thread", 1)


def test_copy_bandwidth(benchmark, refs):
    """The bandwidth probe itself, as a benchmark row (256 MiB fp32 copy; ratio = 1 by definition
    of the floor for 2 x 256 MiB moved)."""
    src = torch.randn(COPY_NUMEL)
    dst = torch.empty_like(src)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=10, warmup_rounds=1)
    benchmark.extra_info.update({"bytes_moved": 2 * src.nbytes,
                                 "GBps_min": round(2 * src.nbytes / benchmark.stats.stats.min / 1e9, 2),
                                 "bandwidth_GBps_fixture": round(refs["bandwidth_GBps"], 2)})


def _cuda_timed(fn):
    """``fn`` then a device synchronize: pytest-benchmark's host clock then times the kernels."""
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.fixture(scope="module")
def cuda_refs():
    """The two teachers on the GPU, the device's copy bandwidth and the loop's time (this run)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA timings need a GPU (scripts/gpu_check.sh runs them)")
    shapes = resnet50_parameter_shapes()
    g = torch.Generator(device="cuda").manual_seed(0)
    teachers = [torch.randn(s, generator=g, device="cuda") for s in shapes + shapes]
    students = [torch.randn(s, generator=g, device="cuda") for s in shapes + shapes]
    src = torch.randn(COPY_NUMEL * 4, device="cuda")  # 1 GiB: well beyond any L2
    dst = torch.empty_like(src)
    t_copy = _min_time(_cuda_timed(lambda: dst.copy_(src)), rounds=10)
    bandwidth = 2 * src.nbytes / t_copy
    del src, dst
    moved = 3 * sum(t.nbytes for t in teachers)
    t_loop = _min_time(_cuda_timed(lambda: ema_update_(teachers, students, ALPHA, backend="loop")), rounds=10)
    return {"lists": (teachers, students), "bandwidth_GBps": bandwidth / 1e9, "floor_s": moved / bandwidth,
            "loop_s": t_loop}


@pytest.mark.parametrize("variant", ["loop", "foreach", "ext", "foreach, device alpha"])
def test_ema_two_resnet50_teachers_cuda(benchmark, cuda_refs, variant):
    """The same update on CUDA tensors: the extension's multi-tensor kernel, ``_foreach_lerp_``,
    the per-tensor loop, and the device-alpha path the skip policy takes (no host read)."""
    teachers, students = cuda_refs["lists"]
    backend = variant.split(",")[0]
    if backend == "ext" and not (load_extension() and load_extension().has_cuda()):
        pytest.fail("fastmmt._C has no CUDA kernel: rebuild with FASTMMT_CUDA=1 (scripts/gpu_check.sh does)")
    alpha = torch.tensor(ALPHA, device="cuda") if "device alpha" in variant else ALPHA
    benchmark.pedantic(_cuda_timed(lambda: ema_update_(teachers, students, alpha, backend)), rounds=20,
                       warmup_rounds=2)
    stats = benchmark.stats.stats
    benchmark.extra_info.update({
        "variant": variant, "bandwidth_GBps": round(cuda_refs["bandwidth_GBps"], 1),
        "floor_ms": round(cuda_refs["floor_s"] * 1e3, 3), "loop_ref_ms": round(cuda_refs["loop_s"] * 1e3, 3),
        "x_floor_min": round(stats.min / cuda_refs["floor_s"], 3),
        "speedup_vs_loop_min": round(cuda_refs["loop_s"] / stats.min, 2),
    })
