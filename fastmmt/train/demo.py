"""The synthetic demo: generate two domains, pre-train on source, adapt with MMT, compare.

It prints one table on the target test set: source-only (pre-trained seed 1), MMT with k-means,
MMT with DBSCAN (optional), and a target-supervised oracle (MMT from the same two source models,
as long, on the target's true identities instead of clusters), with mAP / rank-1/5/10 and time
per stage.
"""
from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from fastmmt.data import ReIDDataset, generate_domains, load_dataset
from fastmmt.train.distributed import env_world_size
from fastmmt.train.mmt import adapt
from fastmmt.train.model_file import StageResult
from fastmmt.train.options import ExperimentOptions
from fastmmt.train.pretrain import pretrain
from fastmmt.train.runtime import resolve_device

log = logging.getLogger("fastmmt.demo")


def demo_options(out_dir: str = "runs/demo", seed: int = 0) -> ExperimentOptions:
    """A recipe small enough for 2 CPU cores in minutes; the same algorithm as the paper's."""
    o = ExperimentOptions()
    o.data.source = o.data.target = "synthetic"
    o.data.height, o.data.width = 64, 32
    o.data.batch_size, o.data.num_instances = 64, 4
    o.data.workers, o.data.test_batch_size = 0, 256
    o.data.backend = "torch"
    o.model.arch, o.model.base_width = "resnet18", 16
    o.model.channels_last = True  # same model; faster convolutions and pooling on a CPU (bench/RESULTS.md)
    o.pretrain.epochs, o.pretrain.iters = 30, 20
    o.pretrain.warmup_epochs, o.pretrain.milestones = 2, (20,)
    o.pretrain.lr = 1e-3
    o.adapt.epochs, o.adapt.iters, o.adapt.lr = 40, 20, 7e-4
    # The paper's cap (0.999 at 400 iterations an epoch) gives the mean teacher a horizon of
    # 1,000 steps, 2.5 epochs; at 20 iterations an epoch the same 2.5 epochs is a cap of 0.98.
    o.adapt.ema_alpha = 0.98
    o.adapt.k = 120
    o.run.out_dir, o.run.seed = out_dir, seed + 1
    o.run.eval_every = 0
    return o


ROW_NAMES = {"kmeans": "MMT (k-means)", "dbscan": "MMT (DBSCAN)", "baseline": "baseline (1 model)",
             "oracle": "oracle (target labels)"}


def _row(name: str, metrics: dict, seconds: float) -> dict:
    return {"method": name, **{k: metrics.get(k) for k in ("mAP", "rank1", "rank5", "rank10")}, "seconds": seconds}


def format_table(rows: list[dict]) -> str:
    """Results as a fixed-width text table (percent)."""
    head = f"{'method':<22}{'mAP':>7}{'R1':>7}{'R5':>7}{'R10':>7}{'time (s)':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = "".join(f"{100 * r[k]:7.1f}" if r[k] is not None else f"{'-':>7}" for k in ("mAP", "rank1", "rank5", "rank10"))
        lines.append(f"{r['method']:<22}{vals}{r['seconds']:10.1f}")
    return "\n".join(lines)


def side_by_side_threads(opts: ExperimentOptions, n: int) -> int | None:
    """Threads per process when ``n`` pre-trainings can run side by side: on the CPU, outside
    torchrun, with at least one core each (None: run them one after another)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n < 2 or cores < n or env_world_size() > 1 or resolve_device(opts.run.device).type != "cpu":
        return None
    return opts.run.num_threads or cores // n


def _timed_pretrain(source: ReIDDataset, target: ReIDDataset | None, opts: ExperimentOptions, seed: int,
                    out_dir: Path) -> tuple[StageResult, float]:
    t0 = time.perf_counter()
    return pretrain(source, target, opts, seed=seed, out_dir=out_dir), time.perf_counter() - t0


def pretrain_models(source: ReIDDataset, target: ReIDDataset | None, opts: ExperimentOptions,
                    runs: list[tuple[int, Path]]) -> list[tuple[StageResult, float]]:
    """Pre-train one source model per ``(seed, out_dir)``; each result with its wall seconds.

    The models are independent: where :func:`side_by_side_threads` finds a core for each, they
    train at once in processes of their own (each with its share of the cores as
    ``run.num_threads``), else one after another in this process.
    """
    threads = side_by_side_threads(opts, len(runs))
    if threads is None:
        return [_timed_pretrain(source, target, opts, s, d) for s, d in runs]
    o = copy.deepcopy(opts)
    o.run.num_threads = threads
    log.info("pre-training %d source models side by side, %d thread(s) each", len(runs), threads)
    with ProcessPoolExecutor(len(runs), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_timed_pretrain, source, target, o, s, d) for s, d in runs]
        return [j.result() for j in jobs]


def run_demo(opts: ExperimentOptions | None = None, seed: int = 0, methods: tuple[str, ...] = ("kmeans",),
             oracle: bool = True, data_size: str = "demo") -> dict:
    """Run the whole demo; returns and writes ``out_dir/results.json``."""
    opts = opts or demo_options(seed=seed)
    out = Path(opts.run.out_dir)
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    src_dir, tgt_dir = generate_domains(str(out / "data"), seed=seed, size=data_size)
    source, target = load_dataset("synthetic", src_dir), load_dataset("synthetic", tgt_dir)
    stage_seconds = {"generate": time.perf_counter() - t0}
    log.info("source: %s", source.summary())
    log.info("target: %s", target.summary())

    rows, inits = [], []
    runs = [(seed * 100 + s, out / "pretrain" / f"seed{s}") for s in opts.pretrain.seeds]
    for s, (res, seconds) in zip(opts.pretrain.seeds, pretrain_models(source, target, opts, runs)):
        stage_seconds[f"pretrain_seed{s}"] = seconds
        inits.append(res.model_path)
        if not rows:
            rows.append(_row("source-only", res.metrics, seconds))
    for method in (*methods, "oracle") if oracle else methods:
        o = copy.deepcopy(opts)
        o.adapt.method = method
        t0 = time.perf_counter()
        res = adapt(target, inits[:1] if method == "baseline" else inits[:2], o, out / method)
        stage_seconds[method] = time.perf_counter() - t0
        rows.append(_row(ROW_NAMES[method], res.metrics, stage_seconds[method]))
        stage_seconds.update({f"{method}_{k}": v for k, v in res.seconds.items()})
    total = time.perf_counter() - t_start
    result = {"seed": seed, "rows": rows, "stage_seconds": stage_seconds, "total_seconds": total,
              "options": asdict(opts)}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result
