"""DALI in distributed runs: 2 gloo ranks on the CPU (torchrun), and a 2-node start.

The target domain is written at the training size (32x16, no resize) so that the DALI and the
torch pipelines see the same decoded pixels (the same libjpeg-turbo) and normalise them with the
same arithmetic: their inputs are then the same bits, and so must be everything downstream.

- One ``torchrun --nproc-per-node 2`` launch runs a tiny MMT adaptation four times: backends
  torch and DALI, augmentation off and on. For each augmentation setting the DALI run must give
  exactly the torch run's batches (indices and view tensors of every rank), pseudo-labels,
  losses and weights (students and teachers, BN buffers included). Both backends draw the views
  from the same per-image seeds, so "the same distribution of view parameters" holds in its
  strongest form: the same parameters.
- Two torchrun processes (``--nnodes 2 --nproc-per-node 1`` with c10d rendezvous on
  127.0.0.1), as a two-node job starts, with ``data.backend: auto``: DALI is picked, the
  adaptation runs to the end, both nodes hold the same pseudo-labels and weights, equal to the
  single-node 2-rank run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmmt.data import load_dataset
from fastmmt.train import pretrain
from synthetic_fixtures import tiny_domain_folders, tiny_options, write_config

pytestmark = pytest.mark.dali  # skipped, with the reason, where DALI is not installed

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
RUNS = ("torch:0", "dali:0", "torch:1", "dali:1")  # backend : data.augment

SCRIPT = """
import importlib, importlib.util, sys
from pathlib import Path
import torch, torch.distributed as dist
import fastmmt.train.mmt as mmt
from fastmmt.cli.config import load_options
from fastmmt.data import load_dataset
from fastmmt.train.distributed import cleanup

cfg, target_root, out, runs, *inits = sys.argv[1:]
trace = {}
real_state, real_train = mmt._Adapt.state_dict, mmt.build_train_loader
# the trainer's modules that build extraction loaders
extractors = [m for m in (importlib.import_module(f"fastmmt.train.{n}") for n in ("common", "extraction")
                          if importlib.util.find_spec(f"fastmmt.train.{n}")) if hasattr(m, "build_test_loader")]
real_test = extractors[0].build_test_loader

def dumping(self, epoch, st):
    state = real_state(self, epoch, st)
    trace["states"].append(state)
    return state

def train_loader(*args, **kwargs):
    loader = real_train(*args, **kwargs)
    trace["train_loaders"].append(type(loader).__name__)
    epoch = loader.epoch
    def recording(e, iters):
        for b in epoch(e, iters):
            trace["batches"].append((e, b.indices.clone(), [v.clone() for v in b.views]))
            yield b
    loader.epoch = recording
    return loader

def test_loader(*args, **kwargs):
    loader = real_test(*args, **kwargs)
    trace["test_loaders"].append(type(loader).__name__)
    return loader

mmt._Adapt.state_dict, mmt.build_train_loader = dumping, train_loader
for m in extractors:
    m.build_test_loader = test_loader
target = load_dataset("synthetic", target_root)
for run in runs.split(","):
    backend, augment = run.split(":")
    opts = load_options(cfg, [f"data.backend={backend}", f"data.augment={bool(int(augment))}"])
    trace.update(states=[], batches=[], train_loaders=[], test_loaders=[])
    mmt.adapt(target, inits, opts, Path(out) / run.replace(":", "_"))
    torch.save(trace, Path(out) / f"{run.replace(':', '_')}_rank{dist.get_rank()}.pt")
cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Target domain at 32x16, two tiny pre-trained models (one process), the config file."""
    root = tmp_path_factory.mktemp("dalidist")
    o = tiny_options(root)
    o.pretrain.epochs, o.pretrain.iters = 1, 2
    o.adapt.epochs, o.adapt.iters = 2, 2
    o.run.eval_every = 0
    o.data.backend, o.data.workers = "torch", 0
    src, tgt = tiny_domain_folders(root / "syn", o.data.height, o.data.width)
    source, target = load_dataset("synthetic", src), load_dataset("synthetic", tgt)
    inits = [pretrain(source, target, o, seed=s, out_dir=root / f"pre{s}").model_path for s in (1, 2)]
    cfg = root / "cfg.yaml"
    write_config(o, cfg)
    script = root / "run_adapt.py"
    script.write_text(SCRIPT)
    return root, cfg, tgt, inits, script


def _run(*launch: str, setup, out: Path, runs: str, cwd=ROOT) -> list[subprocess.Popen]:
    root, cfg, tgt, inits, script = setup
    cmd = [str(TORCHRUN), *launch, str(script), str(cfg), tgt, str(out), runs, *inits]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            _, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{err[-4000:]}"


def _trace(out: Path, run: str, rank: int) -> dict:
    return torch.load(out / f"{run.replace(':', '_')}_rank{rank}.pt", weights_only=False)


def _epochs(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "epoch" in r]


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert np.array_equal(a["labels"], b["labels"]), what
    assert a["global_step"] == b["global_step"], what
    for i, (n0, n1) in enumerate(zip(a["nets"], b["nets"], strict=True)):  # 2 students, 2 teachers
        assert n0.keys() == n1.keys()
        for k in n0:
            assert torch.equal(n0[k], n1[k]), (what, i, k)


@pytest.fixture(scope="module")
def single_node(setup):
    """The four runs under ``torchrun --nproc-per-node 2`` (one launch)."""
    out = setup[0] / "single_node"
    _wait([_run("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                setup=setup, out=out, runs=",".join(RUNS))])
    return out


@pytest.mark.parametrize("augment", ["0", "1"])
def test_dali_under_torchrun_equals_torch_backend(single_node, setup, augment):
    out = single_node
    o_epochs, o_iters = 2, 2
    for rank in range(2):
        ref, dali = _trace(out, f"torch:{augment}", rank), _trace(out, f"dali:{augment}", rank)
        assert set(ref["train_loaders"]) == {"TorchTrainLoader"} and set(dali["train_loaders"]) == {"DaliTrainLoader"}
        assert set(ref["test_loaders"]) == {"DataLoader"} and set(dali["test_loaders"]) == {"DaliTestLoader"}
        assert dali["test_loaders"]  # extraction of this rank's shard (loaders may be kept for the run)
        assert len(ref["batches"]) == len(dali["batches"]) == o_epochs * o_iters
        for (e0, i0, v0), (e1, i1, v1) in zip(ref["batches"], dali["batches"]):
            assert e0 == e1 and torch.equal(i0, i1) and len(i0) == 8  # this rank's half of 16
            assert len(v0) == len(v1) == 2 and all(torch.equal(a, b) for a, b in zip(v0, v1))
        assert len(ref["states"]) == len(dali["states"]) == o_epochs
        for epoch, (a, b) in enumerate(zip(ref["states"], dali["states"])):
            _assert_same_state(a, b, f"rank {rank} epoch {epoch} augment {augment}")
    # the ranks agree, and their shares are disjoint halves of each global batch
    r0, r1 = _trace(out, f"dali:{augment}", 0), _trace(out, f"dali:{augment}", 1)
    _assert_same_state(r0["states"][-1], r1["states"][-1], "rank 0 vs rank 1")
    for (e, i0, _), (_, i1, _) in zip(r0["batches"], r1["batches"]):
        labels = r0["states"][e]["labels"]  # the pseudo-labels epoch e trained on
        ids0, ids1 = set(labels[i0.numpy()].tolist()), set(labels[i1.numpy()].tolist())
        assert len(ids0) == len(ids1) == 2 and not ids0 & ids1
    # rank 0 alone writes the log: the same losses to the bit
    rec_t = _epochs(out / f"torch_{augment}" / "log.jsonl")
    rec_d = _epochs(out / f"dali_{augment}" / "log.jsonl")
    assert len(rec_t) == len(rec_d) == o_epochs
    for a, b in zip(rec_t, rec_d):
        for k in ("loss", "loss_ce", "loss_tri", "loss_soft_ce", "loss_soft_tri", "num_clusters"):
            assert a[k] == b[k], (a["epoch"], k)


def test_augmentation_switch_changes_the_views(single_node):
    off, on = _trace(single_node, "dali:0", 0), _trace(single_node, "dali:1", 0)
    (_, i_off, v_off), (_, i_on, v_on) = off["batches"][0], on["batches"][0]
    assert torch.equal(i_off, i_on)  # the same plan
    assert torch.equal(v_off[0], v_off[1])  # off: both views are the clean image
    assert not torch.equal(v_on[0], v_on[1]) and not torch.equal(v_on[0], v_off[0])


@pytest.mark.slow  # a second pair of launches (~1 min here)
def test_two_nodes_with_c10d_rendezvous(single_node, setup, tmp_path):
    """Two torchrun processes of one rank each meet at a c10d endpoint, as two nodes do."""
    port = _free_port()
    out = tmp_path / "two_nodes"
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fastmmt-test", "--local-addr", "127.0.0.1"]
    # each "node" starts from its own working directory, as on separate machines
    nodes = [_run(*launch, setup=setup, out=out, runs="auto:1", cwd=tmp_path) for _ in range(2)]
    _wait(nodes)
    n0, n1 = _trace(out, "auto:1", 0), _trace(out, "auto:1", 1)
    # data.backend auto picks DALI under torchrun, for training and for extraction
    assert set(n0["train_loaders"]) == set(n1["train_loaders"]) == {"DaliTrainLoader"}
    assert set(n0["test_loaders"]) == set(n1["test_loaders"]) == {"DaliTestLoader"}
    assert (out / "auto_1" / "model.pt").is_file()  # the run went to the end
    for e, (a, b) in enumerate(zip(n0["states"], n1["states"], strict=True)):
        _assert_same_state(a, b, f"node 0 vs node 1, epoch {e}")
    # and the 2-node job computes what the single-node 2-rank job does
    for rank, trace in enumerate((n0, n1)):
        _assert_same_state(trace["states"][-1], _trace(single_node, "dali:1", rank)["states"][-1],
                           f"two nodes vs one node, rank {rank}")
