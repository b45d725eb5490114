"""Distributed training on the CPU: torchrun, 2 processes, gloo, a tiny synthetic run.

``torchrun -m fastmmt pretrain`` trains both seeds with the log written by rank 0. Pre-training
and MMT (k-means and DBSCAN) under torchrun are compared with an independent single-process run
with ``run.bn_split = batch / world`` (the same per-chunk BN statistics), both in float64 and
each in a fresh process: the ranks hold bit-identical pseudo-labels, losses, gradients, students
and teachers (BN buffers included); against the single process, pseudo-labels, cluster counts
and DBSCAN's eps are equal and losses, gradients and weights agree within the rounding bound the
MMT test's docstring derives. Plus the pieces: rank shares of a P x K batch, clear errors.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmmt.data.loaders import TorchTrainLoader
from fastmmt.data.sampler import rank_share
from fastmmt.train.distributed import DistContext, DistributedError, check_batch_shares, shard_range
from synthetic_fixtures import tiny_options, write_config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORLD = 2
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which fastmmt.train.optim.adam keeps
DEPTH = 40  # reductions chained per step, forward and backward (about 20 layers each way)


DUMP_SCRIPT = """
import importlib, os, sys, types
from pathlib import Path
import torch
mmt = importlib.import_module("fastmmt.train.mmt")
pt = importlib.import_module("fastmmt.train.pretrain")  # the package's ``pretrain`` is the function
update = importlib.import_module("fastmmt.train.update")  # every step's update (apply_update) checks its loss there
from fastmmt.cli.config import load_options
from fastmmt.data import load_dataset
from fastmmt.train.distributed import cleanup

stage, cfg, out, dump, *inits = sys.argv[1:]
opts = load_options(cfg)
rank = int(os.environ.get("RANK", "0"))
steps = []  # per step: the loss terms, the gradients' largest entry and L1 norm (first step: all)


def to_float64(make):  # the networks in float64; their inputs are cast on the way in
    def made(*args, **kw):
        net = make(*args, **kw).double()
        net.register_forward_pre_hook(lambda mod, xs: tuple(x.double() for x in xs))
        return net
    return made


def recording_loss(*args, **kw):  # MMT: every term
    out = real_loss(*args, **kw)
    steps.append({"terms": [t.detach().clone() for t in (out.total, out.ce, out.tri, out.soft_ce, out.soft_tri)]})
    return out


def recording_total(check):  # pre-training: the total (ce + tri), as the step's finite check sees it
    def checked(loss, *args, **kw):
        steps.append({"terms": [loss.detach().clone()]})
        return check(loss, *args, **kw)
    return checked


def recording_adam(models, *args):
    models = list(models)
    opt = real_adam(models, *args)
    step = opt.step

    def recording_step(self, *a, **kw):  # after backward (and DDP's all-reduce), before the update
        grads = [p.grad for m in models for p in m.parameters() if p.requires_grad]
        steps[-1]["grad_max"] = max(float(g.abs().max()) for g in grads)
        steps[-1]["grad_l1"] = sum(float(g.abs().sum()) for g in grads)
        if len(steps) == 1:
            steps[0]["grads"] = [g.clone() for g in grads]
        return step(*a, **kw)

    opt.step = types.MethodType(recording_step, opt)  # bound, as an LR scheduler expects
    return opt


def dumping(self, epoch, st):
    state = real_state(self, epoch, st)
    torch.save({**state, "steps": steps}, Path(dump) / f"rank{rank}_ep{epoch}.pt")
    return state


real_loss, real_adam, real_state = mmt.mmt_loss, mmt.adam, mmt._Adapt.state_dict
target = load_dataset("synthetic", opts.data.target_root)
if stage == "adapt":
    mmt.load_model_file = to_float64(mmt.load_model_file)
    mmt.mmt_loss, mmt.adam, mmt._Adapt.state_dict = recording_loss, recording_adam, dumping
    mmt.adapt(target, inits, opts, out)
else:
    pt.make_model, pt.adam = to_float64(pt.make_model), recording_adam
    # the step checks its loss once: on the host (run.sync_each_step) or as a device flag (default)
    update.step_is_finite, update.finite_flag = recording_total(update.step_is_finite), recording_total(update.finite_flag)
    res = pt.pretrain(load_dataset("synthetic", opts.data.source_root), target, opts, seed=1, out_dir=out)
    torch.save({"steps": steps, "model": torch.load(res.model_path, weights_only=False)["model"] if rank == 0 else None},
               Path(dump) / f"rank{rank}_ep{opts.pretrain.epochs - 1}.pt")
cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--nproc-per-node", str(WORLD), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def _epochs(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "epoch" in r]


@pytest.fixture(scope="module")
def domains(tiny_folders):
    return tiny_folders


@pytest.fixture(scope="module")
def dist_pretrained(domains, tmp_path_factory):
    """Both pre-training seeds through ``torchrun -m fastmmt pretrain`` (2 ranks)."""
    src, tgt = domains
    out = tmp_path_factory.mktemp("dist")
    o = tiny_options(out)
    o.pretrain.epochs, o.pretrain.iters = 2, 3
    o.data.source_root, o.data.target_root = src, tgt
    cfg = out / "tiny.yaml"
    write_config(o, cfg)
    _torchrun("-m", "fastmmt", "pretrain", "--config", str(cfg), "--out", str(out), "--no-progress")
    return out, o


def _run_dump(tmp_path: Path, name: str, stage: str, o, inits: list[str], ranks: int) -> Path:
    """DUMP_SCRIPT under torchrun (``ranks`` > 1) or as one plain process; returns the dump folder."""
    cfg = tmp_path / f"{name}.yaml"
    write_config(o, cfg)
    script = tmp_path / "dump_run.py"
    script.write_text(DUMP_SCRIPT)
    dump = tmp_path / f"dump_{name}"
    dump.mkdir()
    args = (str(script), stage, str(cfg), str(tmp_path / name), str(dump), *inits)
    if ranks > 1:
        _torchrun(*args)
    else:  # a fresh process too: nothing the test process did before can change its numbers
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"single process failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return dump


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _check_steps(ranks: list[list[dict]], ref: list[dict], o, lr: float) -> float:
    """Every step's loss terms and the first step's gradients: bit-identical between the ranks,
    within the float64 rounding bound of the single process (see the MMT test's docstring).
    Returns W_1, the bound on one step's weight difference."""
    assert len(ranks[0]) == len(ranks[1]) == len(ref) > 0
    for s0, s1 in zip(*ranks):
        assert torch.equal(torch.stack(s0["terms"]), torch.stack(s1["terms"]))
        assert s0["grad_max"] == s1["grad_max"] and s0["grad_l1"] == s1["grad_l1"]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][0]["grads"], ranks[1][0]["grads"]))
    n_max = o.data.batch_size * (o.data.height // 2) * (o.data.width // 2)
    tau = 2 * DEPTH * n_max * 2.0**-53
    for i, (a, b) in enumerate(zip(ranks[0][0]["grads"], ref[0]["grads"])):
        assert (a - b).abs().max() <= tau * b.abs().max(), f"first step's gradient {i}"
    g = max(s["grad_max"] for s in ref + ranks[0])
    per_step = min(2 * lr, 2 * lr * tau * g / ADAM_EPS)
    for t, (a, b) in enumerate(zip(ranks[0], ref)):
        ta, tb = torch.stack(a["terms"]), torch.stack(b["terms"])
        if t:  # the total loss only: its gradient's L1 norm is what was recorded
            ta, tb = ta[:1], tb[:1]
        bound = tau * tb.abs() + b["grad_l1"] * per_step * t
        assert ((ta - tb).abs() <= bound).all(), (t, ta.tolist(), tb.tolist(), bound.tolist())
    return per_step


def _check_state(a: dict, b: dict, bound: float, what: str) -> None:
    """Integer entries equal; float64 entries within ``bound`` times max(1, their magnitude)."""
    assert a.keys() == b.keys(), what
    for k in a:
        if not b[k].is_floating_point():
            assert torch.equal(a[k], b[k]), (what, k)
            continue
        assert a[k].dtype == b[k].dtype == torch.float64, (what, k)
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= bound * max(1.0, float(b[k].abs().max())), (what, k, diff, bound)


def test_pretrain_under_torchrun_matches_single_process(domains, dist_pretrained, tmp_path):
    """``torchrun -m fastmmt pretrain`` runs both seeds and logs on rank 0; then seed 1 through
    torchrun against one process (``run.bn_split = batch / 2``), both in float64, with the
    bounds of the MMT test below (W_t with the peak learning rate; the schedule only lowers it)."""
    src, tgt = domains
    out, o = dist_pretrained
    for seed in (1, 2):
        recs = _epochs(out / "pretrain" / f"seed{seed}" / "log.jsonl")
        assert [r["epoch"] for r in recs] == [0, 1]  # rank 0 alone writes the log
        assert all(r["world_size"] == WORLD for r in recs)
    o.run.loss_backend = "torch"  # float64
    dist_dump = _run_dump(tmp_path, "dist", "pretrain", o, [], WORLD)
    o.run.bn_split = o.data.batch_size // WORLD
    single_dump = _run_dump(tmp_path, "single", "pretrain", o, [], 1)
    last = f"ep{o.pretrain.epochs - 1}.pt"
    ranks = [_load(dist_dump / f"rank{r}_{last}")["steps"] for r in range(WORLD)]
    ref = _load(single_dump / f"rank0_{last}")
    assert len(ref["steps"]) == o.pretrain.epochs * o.pretrain.iters
    per_step = _check_steps(ranks, ref["steps"], o, o.pretrain.lr)
    for r, q in zip(_epochs(tmp_path / "dist" / "log.jsonl"), _epochs(tmp_path / "single" / "log.jsonl")):
        assert r["acc"] == q["acc"], r["epoch"]  # argmax of float64 logits: no tie within 1e-11
    _check_state(_load(dist_dump / f"rank0_{last}")["model"], ref["model"], per_step * len(ref["steps"]), "model")


@pytest.mark.parametrize("method", ["kmeans", pytest.param("dbscan", marks=pytest.mark.slow)])
def test_mmt_ranks_agree_and_match_single_process(method, domains, dist_pretrained, tmp_path):
    """MMT under torchrun (2 ranks) against one process with ``run.bn_split = batch / 2``, both in
    float64 (networks and their inputs cast; losses on the torch backend, which takes float64).

    Exact, because the same arithmetic on the same values gives the same bits: between the ranks
    after every epoch, the pseudo-labels, the four networks (BN buffers included), every step's
    loss terms and the first step's all-reduced gradients. Against the single process: the
    pseudo-labels, cluster and outlier counts and DBSCAN's eps (clustering reads the features
    rounded to float32, which float64 differences of ~1e-15 do not reach unless one straddles a
    float32 rounding boundary, a chance of about 1e-15 / 6e-8 per feature value).

    Bounded, the rest against the single process. The two runs do the same operations; only the
    order of summation differs (convolutions on 8 images instead of 16, the 2-rank gradient is a
    sum of two half-batch sums). A sum of n float64 terms in two orders differs by at most
    2 n u sum|terms| (u = 2^-53). Per step, forward and backward chain at most DEPTH = 40 reductions
    of at most N_MAX = batch x (H/2) x (W/2) = 2048 terms (the stem's weight gradient), so a value
    computed from the same weights differs by at most TAU = 2 DEPTH N_MAX u = 1.8e-11 of its
    magnitude (to first order): the first step's loss terms and gradients (each tensor, against
    its largest entry). Adam's step lr m/(sqrt(v) + eps) changes by at most lr / eps per unit of
    gradient difference (the worst case, a gradient near zero; on a float32 run TAU is ~1e-2 and
    this is a whole step, which is why the comparison is made in float64), so after t steps every
    weight is within W_t = t 2 lr TAU G / eps, G the largest gradient entry of the run (first
    order: the feedback of the weights' differences into later gradients is neglected). Teachers
    are averages of students; BN buffers are compared with the same W_t relative to their
    magnitude. A later step's total loss moves by at most its gradient's L1 norm times W_(t-1) on
    top of TAU of its value.
    """
    _, tgt = domains
    out, _ = dist_pretrained
    inits = [str(out / "pretrain" / f"seed{s}" / "model.pt") for s in (1, 2)]
    o = tiny_options(tmp_path)
    o.adapt.method, o.adapt.iters = method, 3
    o.run.loss_backend = "torch"  # float64
    if method == "dbscan":
        o.data.batch_size = 8  # P = 2: one identity per rank
    o.data.target_root = tgt
    dist_dump = _run_dump(tmp_path, "dist", "adapt", o, inits, WORLD)
    o.run.bn_split = o.data.batch_size // WORLD
    single_dump = _run_dump(tmp_path, "single", "adapt", o, inits, 1)

    last = o.adapt.epochs - 1
    ranks = [_load(dist_dump / f"rank{r}_ep{last}.pt")["steps"] for r in range(WORLD)]
    ref_steps = _load(single_dump / f"rank0_ep{last}.pt")["steps"]
    assert len(ref_steps) == o.adapt.epochs * o.adapt.iters
    per_step = _check_steps(ranks, ref_steps, o, o.adapt.lr)

    dist_recs = _epochs(tmp_path / "dist" / "log.jsonl")
    ref_recs = _epochs(tmp_path / "single" / "log.jsonl")
    assert len(dist_recs) == len(ref_recs) == o.adapt.epochs
    for epoch, (r, q) in enumerate(zip(dist_recs, ref_recs)):
        assert r["num_clusters"] == q["num_clusters"] and r["num_outliers"] == q["num_outliers"], epoch
        r0, r1 = (_load(dist_dump / f"rank{rank}_ep{epoch}.pt") for rank in range(WORLD))
        ref = _load(single_dump / f"rank0_ep{epoch}.pt")
        assert np.array_equal(r0["labels"], r1["labels"]) and np.array_equal(r0["labels"], ref["labels"]), epoch
        assert r0["global_step"] == r1["global_step"] == ref["global_step"] == (epoch + 1) * o.adapt.iters
        if method == "dbscan":
            assert r0["clusterer"]["eps"] == ref["clusterer"]["eps"], epoch  # rank 0 clusters
        for i, (n0, n1, nr) in enumerate(zip(r0["nets"], r1["nets"], ref["nets"])):  # 2 students, 2 teachers
            assert n0.keys() == n1.keys() and all(torch.equal(n0[k], n1[k]) for k in n0), (epoch, i)
            _check_state(n0, nr, per_step * r0["global_step"], f"epoch {epoch} net {i}")


def test_rank_shares_are_whole_disjoint_identities_of_the_global_batch(tmp_path):
    records = []
    from fastmmt.data.records import ImageRecord
    from PIL import Image
    for i in range(48):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 16), (i * 5, 0, 0)).save(p)
        records.append(ImageRecord(str(p), i // 4, i % 3))
    labels = np.array([r.pid for r in records])
    full = TorchTrainLoader(records, labels, 16, 8, batch_size=16, num_instances=4, workers=0, seed=5)
    shards = [TorchTrainLoader(records, labels, 16, 8, batch_size=16, num_instances=4, workers=0, seed=5,
                               rank=r, world_size=WORLD) for r in range(WORLD)]
    for b, *parts in zip(full.epoch(1, 3), *(s.epoch(1, 3) for s in shards)):
        assert torch.equal(torch.cat([p.indices for p in parts]), b.indices)
        assert torch.equal(torch.cat([p.views[0] for p in parts]), b.views[0])  # same augmentation
        ids = [set(p.labels.tolist()) for p in parts]
        assert all(len(s) == 16 // 4 // WORLD for s in ids) and not ids[0] & ids[1]
        assert all(torch.equal(torch.bincount(p.labels)[p.labels], torch.full((8,), 4)) for p in parts)
    assert rank_share(64, 4, 3, 4) == slice(48, 64)
    with pytest.raises(ValueError, match="whole identities over 3 ranks"):
        rank_share(64, 4, 0, 3)
    with pytest.raises(DistributedError, match="multiple of 12"):
        check_batch_shares(16, 4, DistContext(world_size=3))
    assert [list(shard_range(5, DistContext(rank=r, world_size=2))) for r in (0, 1)] == [[0, 1, 2], [3, 4]]


def test_sync_bn_on_cpu_is_a_clear_error(domains, dist_pretrained, tmp_path):
    _, tgt = domains
    out, _ = dist_pretrained
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--nproc-per-node", str(WORLD), "--master-addr", "127.0.0.1", "--master-port",
           str(_free_port()), "-m", "fastmmt", "adapt", "--config", str(out / "tiny.yaml"),
           "--set", "run.sync_bn=true", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    for rank in range(WORLD):  # each rank: one line naming the option, no traceback of ours
        assert f"fastmmt adapt: [rank {rank}] error: run.sync_bn=true needs CUDA" in proc.stderr
    assert "fastmmt/train" not in proc.stderr


CLEANUP_SCRIPT = """
import os, torch
from fastmmt.train import distributed as ddp

def native_threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

ctx = ddp.setup(torch.device("cpu"))
net = ddp.wrap_ddp(torch.nn.Linear(3, 2), ctx)  # DDP imports torch.distributed.nn, which binds WORLD
(net(torch.ones(4, 3)).sum() * ctx.world_size).backward()
before = native_threads()
del net
ddp.cleanup()
# one write per rank (a short line is atomic on a pipe): print's separate pieces interleaved between ranks
print(f"RANK {ctx.rank} BEFORE {before} AFTER {native_threads()}", flush=True)
"""


def test_cleanup_frees_the_process_group_and_joins_its_threads(tmp_path):
    """After ``cleanup`` no gloo thread is left: the group is destroyed there, on the main thread,
    not by the garbage collector during interpreter shutdown, where a C++ thread still running
    could abort the rank at exit (``terminate called without an active exception``)."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux /proc to list the process's native threads")
    script = tmp_path / "cleanup.py"
    script.write_text(CLEANUP_SCRIPT)
    proc = _torchrun(str(script))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RANK")]
    assert len(lines) == WORLD, proc.stdout
    for line in lines:
        before, after = line.split("BEFORE", 1)[1].split("AFTER")
        assert "pt_gloo_runloop" in before, line  # the threads the test is about exist during the run
        assert "gloo" not in after, line


ABORT_AT_EXIT_SCRIPT = """
import os, sys
from fastmmt.cli import main

main(sys.argv[1:])  # returns after cleanup; the old abort came after this, in interpreter shutdown
sys.stdout.flush()
sys.stderr.flush()
os.abort()
"""


@pytest.mark.slow
def test_every_output_is_complete_when_a_rank_dies_right_after_main(domains, dist_pretrained, tmp_path):
    """Both ranks abort at the moment the exit-time abort happened: everything adapt writes is
    already complete (checkpoints are fsynced and renamed, log lines flushed and closed)."""
    _, tgt = domains
    out, _ = dist_pretrained
    script = tmp_path / "abort_at_exit.py"
    script.write_text(ABORT_AT_EXIT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--nproc-per-node", str(WORLD), "--master-addr", "127.0.0.1", "--master-port",
           str(_free_port()), str(script), "adapt", "--config", str(out / "tiny.yaml"), "--out", str(tmp_path),
           "--init", *(str(out / "pretrain" / f"seed{s}" / "model.pt") for s in (1, 2)),
           "--set", "adapt.iters=2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "SIGABRT" in proc.stderr, proc.stderr[-2000:]  # both ranks died
    run = tmp_path / "kmeans"
    text = (run / "log.jsonl").read_text()
    assert text.endswith("\n")
    recs = [json.loads(x) for x in text.splitlines()]
    assert [r["epoch"] for r in recs if "epoch" in r] == [0, 1] and recs[-1].get("final")
    ck = _load(run / "ckpt" / "last.pt")
    assert ck["epoch"] == 1 and ck["global_step"] == 4
    assert set(_load(run / "model.pt")) >= {"model", "num_classes"}
    assert set(json.loads((run / "results.json").read_text())["metrics"]) == {"mAP", "rank1", "rank5", "rank10"}
