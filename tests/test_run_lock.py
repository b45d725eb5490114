"""One run per output folder, and what a killed run leaves behind (docs/reliability.md).

A second run on a held folder is refused at once with one line naming the holder's process and
host, touching nothing; the lock of a run that was SIGKILLed is taken over by the next run; the
lock goes on every exit; of processes racing for a folder (a free one or one with a stale lock)
exactly one wins, as exclusive creation makes it; under torchrun rank 0 holds it and every rank
is refused together; temporary files of a write killed mid-way are removed by the next run.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmmt.train.run_lock import LOCK_NAME, RunLock, RunLockedError, hold_folders
from reliability_env import adapt_args, copy_run, digest, one_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture
def env(tiny_run):
    return tiny_run


HOLDER = """
import sys, time
from fastmmt.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("HELD", flush=True)
time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "HELD"
    return proc


def test_second_run_is_refused_then_a_dead_holders_lock_is_taken_over(env, capsys, tmp_path):
    run = copy_run(env, tmp_path)
    proc = _holder(run / "kmeans")
    try:
        before = digest(run)
        t0 = time.monotonic()
        rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=2", extra=("--resume",)))
        one_line(rc, err, f"process {proc.pid} on host {socket.gethostname()}", str(run / "kmeans"))
        assert time.monotonic() - t0 < 30  # at once, not after training
        assert digest(run) == before  # not touched, config.yaml included
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    # the holder died without releasing: its lock is stale and the next run takes it over
    assert (run / "kmeans" / LOCK_NAME).exists()
    rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=2", extra=("--resume",)))
    assert rc == 0, err
    assert torch.load(run / "kmeans" / "ckpt" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (run / "kmeans" / LOCK_NAME).exists()  # released at the end


def test_lock_released_on_error_and_reentrant_in_one_process(env, capsys, tmp_path):
    rc, err = run_cli(capsys, adapt_args(env, tmp_path / "o", "adapt.k=100000"))
    assert rc == 1 and "lower adapt.k" in err
    assert not (tmp_path / "o" / "kmeans" / LOCK_NAME).exists()
    folder = tmp_path / "f"
    with hold_folders([folder]):
        with hold_folders([folder]):  # the CLI, then the stage, in one process
            assert (folder / LOCK_NAME).exists()
        assert (folder / LOCK_NAME).exists()
        with pytest.raises(RunLockedError, match=f"process {os.getpid()} on host"):
            RunLock(folder).acquire()  # another holder, even in this process
    assert not (folder / LOCK_NAME).exists()
    with pytest.raises(KeyboardInterrupt):
        with hold_folders([folder]):
            raise KeyboardInterrupt
    assert not (folder / LOCK_NAME).exists()


def _race(folder: str, barrier, queue) -> None:
    barrier.wait()
    try:
        RunLock(folder).acquire()
        queue.put(os.getpid())
        time.sleep(1.0)  # hold it while the others try
    except RunLockedError:
        queue.put(None)


@pytest.mark.parametrize("stale", [False, True])
def test_exactly_one_of_racing_processes_takes_the_folder(tmp_path, stale):
    folder = tmp_path / "f"
    folder.mkdir()
    if stale:  # a lock left by a process that no longer exists, on this host
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                    "started": "1", "token": "x"}))
    ctx = mp.get_context("fork")
    queue, barrier = ctx.Queue(), ctx.Barrier(6)
    procs = [ctx.Process(target=_race, args=(str(folder), barrier, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results


def test_lock_from_another_host_is_not_taken_and_says_how_to_clear_it(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-b", "since": "then", "token": "x"}))
    with pytest.raises(RunLockedError, match=r"process 1 on host node-b .*remove .*\.fastmmt\.lock"):
        RunLock(folder).acquire()


LOCK_UNDER_TORCHRUN = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from fastmmt.train.distributed import cleanup, setup
from fastmmt.train.run_lock import LOCK_NAME, RunLockedError, hold_folder

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
ctx = setup(torch.device("cpu"))
res = {"pid": os.getpid()}
try:
    with hold_folder(folder, ctx):
        dist.barrier()
        res["holder"] = json.loads((folder / LOCK_NAME).read_text())["pid"]
        dist.barrier()
    dist.barrier()
    res["after"] = (folder / LOCK_NAME).exists()
except RunLockedError as e:
    res["refused"] = str(e)
(out / f"rank{ctx.rank}.json").write_text(json.dumps(res))
cleanup()
"""


def _torchrun_lock(folder: Path, out: Path) -> list[dict]:
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = out / "lock_script.py"
    script.write_text(LOCK_UNDER_TORCHRUN)
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           str(script), str(folder), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_is_refused(tmp_path):
    folder = tmp_path / "run"
    ranks = _torchrun_lock(folder, tmp_path / "a")
    assert ranks[0]["holder"] == ranks[1]["holder"] == ranks[0]["pid"]
    assert not ranks[0]["after"] and not ranks[1]["after"]
    with hold_folders([folder]):  # held by this (live) process: both ranks refuse
        ranks = _torchrun_lock(folder, tmp_path / "b")
    assert all(f"process {os.getpid()} on host" in r["refused"] for r in ranks)


KILLED_MID_WRITE = """
import sys, time
import torch
from fastmmt.cli import main

real = torch.save

def stalls(obj, f, *a, **k):
    if isinstance(obj, dict) and "nets" in obj and obj.get("epoch") == 1:
        f.write(b"the first bytes of a checkpoint")
        f.flush()
        print("WRITING", flush=True)
        time.sleep(600)  # killed here, mid-write
    return real(obj, f, *a, **k)

torch.save = stalls
sys.exit(main(sys.argv[1:]))
"""


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run(env, capsys, tmp_path, caplog):
    out = tmp_path / "out"
    args = adapt_args(env, out, "adapt.epochs=2") + ["--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if line.strip() == "WRITING" or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    run = out / "kmeans"
    left = list((run / "ckpt").glob(".last.pt.*.tmp"))
    assert len(left) == 1 and (run / LOCK_NAME).exists()  # what the kill left: a temp file, a stale lock
    mine = run / "notes.tmp"  # not a temporary file of fastmmt's: kept
    mine.write_text("mine")
    with caplog.at_level("INFO"):
        rc, err = run_cli(capsys, [*args[:-1], "--resume"])
    assert rc == 0, err
    assert not list(run.rglob(".*.tmp")) and mine.read_text() == "mine"
    assert "removed 1 temporary file" in caplog.text
    assert torch.load(run / "ckpt" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (run / LOCK_NAME).exists()


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """A full disk while the lock's record is written: the error, and no empty lock that would
    refuse every later run."""
    import errno

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        RunLock(tmp_path / "f").acquire()
    monkeypatch.setattr(os, "fsync", real)
    assert not (tmp_path / "f" / LOCK_NAME).exists()
    RunLock(tmp_path / "f").acquire().release()
