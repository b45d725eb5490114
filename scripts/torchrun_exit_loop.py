"""Run the tiny 2-rank ``torchrun -m fastmmt pretrain|adapt`` many times; count the exit codes.

Each run starts from nothing in its own folder: pre-training (both seeds), then MMT with k-means
and with DBSCAN from that run's models. After each command every output it must leave is checked
complete: the last line of each ``log.jsonl`` parses (and is the ``final`` record for adapt), and
the last checkpoint and model files load. A failing command's stderr is kept in its folder; with
``--cores`` each rank may dump a core there (``ulimit -c unlimited``; the kernel's core_pattern
decides the name) for ``gdb <python> <core>``.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/torchrun_exit_loop.py --runs 30 --out runs/exitloop

Prints one line per command and a summary; writes ``OUT/summary.json``. Exit status 1 when any
command failed or left an incomplete output.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train_e2e import tiny_options  # noqa: E402  (the tiny recipe the tests use)

from fastmmt.data import generate_domains  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_record(path: Path) -> dict:
    lines = path.read_text().splitlines()
    if not lines or not path.read_text().endswith("\n"):
        raise ValueError(f"{path}: empty or last line unterminated")
    return json.loads(lines[-1])


def _check_outputs(stage: str, out: Path) -> str | None:
    """None when every file ``stage`` writes is complete, else what is wrong."""
    try:
        if stage == "pretrain":
            for seed in (1, 2):
                run = out / "pretrain" / f"seed{seed}"
                _last_record(run / "log.jsonl")
                torch.load(run / "model.pt", weights_only=False)
        else:
            run = out / stage
            rec = _last_record(run / "log.jsonl")
            if not rec.get("final"):
                raise ValueError(f"{run / 'log.jsonl'}: last record is not the final one: {rec}")
            torch.load(run / "ckpt" / "last.pt", weights_only=False)
            torch.load(run / "model.pt", weights_only=False)
            json.loads((run / "results.json").read_text())
    except Exception as e:  # any unreadable output is a finding, reported
        return f"{type(e).__name__}: {e}"
    return None


def _run(cmd: list[str], cwd: Path, cores: bool) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}

    def limits() -> None:
        if cores:
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, preexec_fn=limits)
    return p.returncode, p.stderr, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="runs/exitloop")
    ap.add_argument("--stages", default="pretrain,kmeans,dbscan")
    ap.add_argument("--cores", action="store_true", help="let the ranks dump cores (ulimit -c unlimited)")
    args = ap.parse_args()
    base = Path(args.out).resolve()
    base.mkdir(parents=True, exist_ok=True)
    src, tgt = generate_domains(str(base / "syn"), seed=3, size="tiny", height=64, width=32)
    o = tiny_options(base)
    o.pretrain.epochs, o.pretrain.iters = 2, 3
    o.adapt.iters = 3
    o.data.source_root, o.data.target_root = src, tgt
    cfg = base / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(asdict(o)))))
    stages = args.stages.split(",")
    counts = {s: {"exit0": 0, "failed": 0, "incomplete": 0} for s in stages}
    failures = []
    for i in range(args.runs):
        out = base / f"run{i:03d}"
        out.mkdir(exist_ok=True)
        for stage in stages:
            common = ["--config", str(cfg), "--out", str(out), "--no-progress"]
            if stage == "pretrain":
                sub = ["pretrain", *common]
            else:
                sub = ["adapt", *common, "--method", stage]
                if stage == "dbscan":
                    sub += ["--set", "data.batch_size=8"]  # P = 2: one identity per rank
            cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port()), "-m", "fastmmt", *sub]
            rc, err, secs = _run(cmd, out, args.cores)
            problem = _check_outputs(stage, out)
            counts[stage]["exit0" if rc == 0 else "failed"] += 1
            counts[stage]["incomplete"] += problem is not None
            print(f"run {i:3d} {stage:8s} exit {rc} {secs:6.1f}s" + (f"  INCOMPLETE: {problem}" if problem else ""),
                  flush=True)
            if rc != 0 or problem:
                (out / f"{stage}.stderr").write_text(err)
                failures.append({"run": i, "stage": stage, "rc": rc, "problem": problem,
                                 "stderr_tail": err[-2000:]})
    summary = {"runs": args.runs, "counts": counts, "failures": failures}
    (base / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(counts))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
