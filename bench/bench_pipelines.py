"""Input pipeline throughput: DALI against the torch + Pillow reference, same files, same run.

- MMT training stream: P x K batches of 64 (16 x 4), two independently augmented 256x128 views
  per image (resize, flip, pad 10 + crop, normalise, erasing). DALI on the CPU with 2 threads
  (``DaliTrainLoader``) vs ``TorchTrainLoader`` (a ``torch.utils.data.DataLoader`` with 2
  worker processes). Throughput counts images (each image gives both views).
- Test extraction: resize + normalise in record order, batches of 128: ``DaliTestLoader`` vs
  the torch ``build_torch_test_loader`` with 2 workers.
- Distributed: the training stream under 2 ranks x 1 thread each (two processes, each reading
  its half of every global batch of 64 through the shared ``BatchPlanner`` plan): DALI with one
  thread per rank vs the torch DataLoader with one worker process per rank. Throughput counts
  the images of the global batches (both ranks together).
- On a GPU (skipped without CUDA): the same streams with nvJPEG ``mixed`` decoding.

Source images are synthetic 128x64 JPEGs (the size of Market-1501 crops), upscaled to 256x128.
``extra_info`` holds images/s of both pipelines and ``speedup_vs_torch`` (DALI / torch).

Run: .venv/bin/python -m pytest bench/bench_pipelines.py -q --benchmark-columns=min,median,rounds
Smoke run (sizes only): FASTMMT_BENCH_ITERS=1 FASTMMT_BENCH_ROUNDS=1 .venv/bin/python -m pytest
bench/bench_pipelines.py -q --benchmark-min-rounds=1
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastmmt.data import ImageRecord, TorchTrainLoader
from fastmmt.data.dali import DaliTestLoader, DaliTrainLoader
from fastmmt.data.factory import build_train_loader, dali_available
from fastmmt.data.loaders import build_torch_test_loader

if not dali_available():  # a GPU machine with no package registry may lack it: say so, time nothing
    pytest.skip("NVIDIA DALI is not installed here", allow_module_level=True)

H, W = 256, 128
IDS, PER_ID = 96, 6
ITERS = int(os.environ.get("FASTMMT_BENCH_ITERS", "6"))  # batches of 64 per timed round (training)
ROUNDS = int(os.environ.get("FASTMMT_BENCH_ROUNDS", "3"))
WORLD = 2


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
    """576 smooth, noisy 128x64 JPEGs (about 5 kB each, like re-ID crops)."""
    root = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:64]
    recs = []
    for pid in range(IDS):
        colour = rng.uniform(40, 215, 3)
        for k in range(PER_ID):
            base = colour + 40 * np.stack([np.sin(yy / 9 + k), np.cos(xx / 5 + pid), np.sin((yy + xx) / 13)], -1)
            arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            path = root / f"{pid:04d}_c{k % 6 + 1}s1_{k:06d}_00.jpg"
            Image.fromarray(arr).save(path, quality=90)
            recs.append(ImageRecord(str(path), pid, k % 6))
    return recs


def _rate(run, images: int, rounds: int = ROUNDS) -> float:
    """Median images/s of ``run()`` over ``rounds`` (after one warm-up call)."""
    run()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return images / statistics.median(times)


def _train_round(loader, epoch_counter: list[int]) -> None:
    epoch_counter[0] += 1
    for batch in loader.epoch(epoch_counter[0], ITERS):
        assert len(batch.views) == 2


def _bench_train(benchmark, records, **dali_kwargs) -> None:
    labels = np.array([r.pid for r in records])
    dali = DaliTrainLoader(records, labels, H, W, batch_size=64, num_views=2, workers=2, **dali_kwargs)
    ref = TorchTrainLoader(records, labels, H, W, batch_size=64, num_views=2, workers=2)
    n = ITERS * 64
    ref_counter = [1000]
    torch_rate = _rate(lambda: _train_round(ref, ref_counter), n)
    counter = [0]
    _train_round(dali, counter)  # warm-up: pipeline build, first reads
    benchmark.pedantic(lambda: _train_round(dali, counter), rounds=ROUNDS, iterations=1)
    dali_rate = n / benchmark.stats.stats.median
    benchmark.extra_info.update(dali_images_per_s=dali_rate, torch_images_per_s=torch_rate,
                                speedup_vs_torch=dali_rate / torch_rate)


def _test_round(loader) -> None:
    for images, *_ in loader:
        assert images.shape[1:] == (3, H, W)


def _bench_test(benchmark, records, **dali_kwargs) -> None:
    dali = DaliTestLoader(records, H, W, batch_size=128, workers=2, **dali_kwargs)
    ref = build_torch_test_loader(records, H, W, batch_size=128, workers=2)
    torch_rate = _rate(lambda: _test_round(ref), len(records))
    _test_round(dali)
    benchmark.pedantic(lambda: _test_round(dali), rounds=ROUNDS, iterations=1)
    dali_rate = len(records) / benchmark.stats.stats.median
    benchmark.extra_info.update(dali_images_per_s=dali_rate, torch_images_per_s=torch_rate,
                                speedup_vs_torch=dali_rate / torch_rate)


def _rank_process(conn, records: list[ImageRecord], backend: str, rank: int) -> None:
    """One rank: its share of the global two-view batches, one thread (DALI) or one worker
    process (torch); runs an epoch of ``iters`` batches per request."""
    torch.set_num_threads(1)
    labels = np.array([r.pid for r in records])
    extra = {"device": "cpu"} if backend == "dali" else {}
    loader = build_train_loader(records, labels, H, W, batch_size=64, num_views=2, workers=1, backend=backend,
                                rank=rank, world_size=WORLD, **extra)
    epoch = 0
    while (iters := conn.recv()) is not None:
        epoch += 1
        for batch in loader.epoch(epoch, iters):
            assert len(batch.views) == 2 and len(batch.indices) == 64 // WORLD
        conn.send(epoch)


class _Ranks:
    """``WORLD`` rank processes of one backend, kept alive between timed rounds."""

    def __init__(self, records: list[ImageRecord], backend: str) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(WORLD):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank_process, args=(child, records, backend, rank))  # not daemonic: DataLoader workers
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def round(self, iters: int = ITERS) -> None:
        """Every rank reads ``iters`` batches; returns when the slowest rank is done."""
        for c in self.conns:
            c.send(iters)
        for c in self.conns:
            c.recv()

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:  # that rank already died (its error is in the output)
                pass
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()


def test_mmt_train_stream_cpu(benchmark, records):
    _bench_train(benchmark, records, device="cpu")


def test_extraction_cpu(benchmark, records):
    _bench_test(benchmark, records, device="cpu")


def test_mmt_train_stream_2_ranks_1_thread_cpu(benchmark, records):
    """2 ranks x 1 thread: DALI against the torch DataLoader, same run, global images/s."""
    n = ITERS * 64
    ref = _Ranks(records, "torch")
    try:
        torch_rate = _rate(ref.round, n)
    finally:
        ref.close()
    dali = _Ranks(records, "dali")
    try:
        dali.round()  # warm-up: pipeline build, first reads
        benchmark.pedantic(dali.round, rounds=ROUNDS, iterations=1)
    finally:
        dali.close()
    dali_rate = n / benchmark.stats.stats.median
    benchmark.extra_info.update(dali_images_per_s=dali_rate, torch_images_per_s=torch_rate,
                                speedup_vs_torch=dali_rate / torch_rate, ranks=WORLD, threads_per_rank=1)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_mmt_train_stream_gpu_mixed_decoding(benchmark, records):
    _bench_train(benchmark, records, device="gpu")


@needs_cuda
def test_extraction_gpu_mixed_decoding(benchmark, records):
    _bench_test(benchmark, records, device="gpu")
