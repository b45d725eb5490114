"""Determinism and exact resume (CPU, ``run.deterministic``).

- two runs (pre-training, MMT k-means with a DataLoader worker and bounded FAISS threads) give
  bit-identical weights;
- a run SIGKILLed in the middle of its second epoch and resumed with ``fastmmt adapt --resume``
  ends with the weights of an uninterrupted run, bit for bit (DBSCAN: its eps is restored);
- a truncated ``last.pt`` is reported and ``--resume`` falls back to ``prev.pt``, replaying the
  lost epoch to the same bits; no temporary checkpoint file is ever left behind.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmmt.cli import main as cli_main
from fastmmt.data import load_dataset
from fastmmt.train import adapt, pretrain
from synthetic_fixtures import tiny_domain_folders, tiny_options, write_config

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import sys, time
import fastmmt.train.mean_teacher as mean_teacher
from fastmmt.cli import main

stop_at = int(sys.argv[1])
real, steps = mean_teacher.ema_update_module_, [0]

def announced(*args, **kwargs):
    out = real(*args, **kwargs)
    steps[0] += 1
    print(f"STEP {steps[0]}", flush=True)
    if steps[0] == stop_at:
        time.sleep(600)  # parked mid-epoch until the test kills it
    return out

mean_teacher.ema_update_module_ = announced
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(autouse=True)
def _restore(restore_torch_globals):
    yield


def _options(out: Path):
    o = tiny_options(out)
    o.run.deterministic = True
    o.run.num_threads = 2
    o.run.eval_every = 0
    return o


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    src, tgt = tiny_domain_folders(root / "syn")
    source, target = load_dataset("synthetic", src), load_dataset("synthetic", tgt)
    o = _options(root)
    inits = [pretrain(source, target, o, seed=s, out_dir=root / f"seed{s}").model_path for s in (1, 2)]
    return root, source, target, inits


def _nets(ckpt: Path) -> list[dict]:
    return torch.load(ckpt, weights_only=False)["nets"]


def _assert_bit_identical(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


def test_two_deterministic_runs_are_bit_identical(setup, tmp_path):
    root, source, target, inits = setup
    o = _options(tmp_path)
    again = pretrain(source, target, o, seed=1, out_dir=tmp_path / "seed1")
    first, second = torch.load(inits[0])["model"], torch.load(again.model_path)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    o.data.workers = 1  # augmentation in a DataLoader worker process
    for run in ("a", "b"):
        adapt(target, inits, o, tmp_path / run)
    _assert_bit_identical(_nets(tmp_path / "a" / "ckpt" / "last.pt"), _nets(tmp_path / "b" / "ckpt" / "last.pt"))
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in la] == [r.get("loss") for r in lb]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(setup, tmp_path, caplog):
    root, _, target, inits = setup
    o = _options(tmp_path)
    o.adapt.method, o.adapt.epochs, o.adapt.iters = "dbscan", 3, 2
    o.data.batch_size, o.adapt.min_samples = 8, 2  # barely trained features: keep >= 2 clusters
    o.data.target_root = target.root
    ref = tmp_path / "ref"
    adapt(target, inits, o, ref / "dbscan")

    cfg = tmp_path / "cfg.yaml"
    write_config(o, cfg)
    out = tmp_path / "killed"
    args = ["adapt", "--config", str(cfg), "--out", str(out), "--init", *inits, "--no-progress"]
    stop_at = o.adapt.iters + 1  # one step into the second epoch, one to go
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(stop_at), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if line.strip() == f"STEP {stop_at}" or time.monotonic() > deadline:
                break
        run = out / "dbscan"
        logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in logged] == [0], "the first epoch is done and logged, the second started"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(run / "ckpt" / "last.pt", weights_only=False)["epoch"] == 0
    assert not list(run.rglob("*.tmp"))

    assert cli_main([*args, "--resume"]) == 0
    ref_nets = _nets(ref / "dbscan" / "ckpt" / "last.pt")
    _assert_bit_identical(_nets(run / "ckpt" / "last.pt"), ref_nets)
    ck, ref_ck = (torch.load(p / "ckpt" / "last.pt", weights_only=False) for p in (run, ref / "dbscan"))
    assert ck["global_step"] == ref_ck["global_step"] == o.adapt.epochs * o.adapt.iters
    assert ck["clusterer"] == ref_ck["clusterer"] and ck["clusterer"]["eps_epoch"] == 0
    assert (ck["labels"] == ref_ck["labels"]).all()

    # a truncated last.pt: reported, prev.pt (epoch 1) used, epoch 2 replayed to the same bits
    last = run / "ckpt" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        assert cli_main([*args, "--resume"]) == 0
    assert "last.pt is unreadable" in caplog.text
    _assert_bit_identical(_nets(last), ref_nets)
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in logged] == [0, 1, 2, None], "the replayed epoch is logged once, one final record"
    assert not list(run.rglob("*.tmp"))
