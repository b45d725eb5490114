"""Distributed training on the CPU: torchrun, 2 processes, gloo, a tiny synthetic run.

Checks, against an independent single-process run with ``run.bn_split = batch / world`` (the
same per-chunk BN statistics): pre-training through ``torchrun -m fastmmt pretrain`` gives the
same losses and weights; MMT (k-means and DBSCAN) gives the same pseudo-labels, losses and
weights, and after every epoch both ranks hold bit-identical pseudo-labels, students and teachers
(BN buffers included). Plus the pieces: rank shares of a P x K batch, clear errors.
"""
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fastmmt.data import generate_domains, load_dataset
from fastmmt.data.loaders import TorchTrainLoader
from fastmmt.data.sampler import rank_share
from fastmmt.train import pretrain
from fastmmt.train.distributed import DistContext, DistributedError, check_batch_shares, shard_range
from test_train_e2e import tiny_options

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORLD = 2
# Single-process and 2-rank runs do the same arithmetic except that convolutions run on batches
# of 8 instead of 16 (different blocking): float32 rounding differences, measured <= 2e-6 in the
# losses. Adam divides by sqrt(v): for an element whose gradient is ~0 such a difference can change
# the step by up to ~lr, so a handful of weights may differ by up to 2 * lr * steps (measured: 5 of
# 178k elements, 6e-4 after 6 steps); every other element must agree to ATOL.
RTOL, ATOL = 1e-4, 1e-5
MAX_ODD_FRACTION = 1e-3

DUMP_SCRIPT = """
import os, sys
from pathlib import Path
import torch
import fastmmt.train.mmt as mmt
from fastmmt.cli.config import load_options
from fastmmt.data import load_dataset
from fastmmt.train.distributed import cleanup

cfg, target_root, out, dump, *inits = sys.argv[1:]
rank = int(os.environ.get("RANK", "0"))
steps = []  # per step: the loss terms and (first step only) the averaged gradients


def to_float64(*args, **kw):  # the networks in float64; their inputs are cast on the way in
    net = real_load(*args, **kw).double()
    net.register_forward_pre_hook(lambda mod, xs: tuple(x.double() for x in xs))
    return net


def recording_loss(*args, **kw):
    out = real_loss(*args, **kw)
    steps.append({"terms": [t.detach().clone() for t in (out.total, out.ce, out.tri, out.soft_ce, out.soft_tri)]})
    return out


def recording_adam(models, *args):
    models = list(models)
    opt = real_adam(models, *args)
    step = opt.step

    def recording_step(*a, **kw):  # after backward (and DDP's all-reduce), before the update
        grads = [p.grad for m in models for p in m.parameters() if p.requires_grad]
        steps[-1]["grad_max"] = max(float(g.abs().max()) for g in grads)
        steps[-1]["grad_l1"] = sum(float(g.abs().sum()) for g in grads)
        if len(steps) == 1:
            steps[0]["grads"] = [g.clone() for g in grads]
        return step(*a, **kw)

    opt.step = recording_step
    return opt


def dumping(epoch, st, nets, labels, clusterer):
    state = real_state(epoch, st, nets, labels, clusterer)
    torch.save({**state, "steps": steps}, Path(dump) / f"rank{rank}_ep{epoch}.pt")
    return state


real_load, real_loss, real_adam, real_state = mmt.load_model_file, mmt.mmt_loss, mmt.adam, mmt._epoch_state
mmt.load_model_file, mmt.mmt_loss, mmt.adam, mmt._epoch_state = to_float64, recording_loss, recording_adam, dumping
mmt.adapt(load_dataset("synthetic", target_root), inits, load_options(cfg), out)
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


def _assert_close_state(a: dict, b: dict, what: str, adam_bound: float) -> None:
    """Weights equal to ATOL/RTOL except a tiny fraction, which stays within ``adam_bound``."""
    assert a.keys() == b.keys(), what
    odd = total = 0
    for k in a:
        x, y = a[k].double(), b[k].double()
        diff = (x - y).abs()
        assert diff.max() <= adam_bound, f"{what}: {k} differs by {diff.max():.3g} > {adam_bound:.3g}"
        odd += int((diff > ATOL + RTOL * y.abs()).sum())
        total += x.numel()
    assert odd <= MAX_ODD_FRACTION * total, f"{what}: {odd} of {total} elements differ"


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    src, tgt = generate_domains(str(root), seed=3, size="tiny", height=64, width=32)
    return src, tgt


@pytest.fixture(scope="module")
def dist_pretrained(domains, tmp_path_factory):
    """Both pre-training seeds through ``torchrun -m fastmmt pretrain`` (2 ranks)."""
    src, tgt = domains
    out = tmp_path_factory.mktemp("dist")
    o = tiny_options(out)
    o.pretrain.epochs, o.pretrain.iters = 2, 3
    o.data.source_root, o.data.target_root = src, tgt
    cfg = out / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(asdict(o)))))
    _torchrun("-m", "fastmmt", "pretrain", "--config", str(cfg), "--out", str(out), "--no-progress")
    return out, o


def test_pretrain_under_torchrun_matches_single_process(domains, dist_pretrained, tmp_path):
    src, tgt = domains
    out, o = dist_pretrained
    o.run.bn_split = o.data.batch_size // WORLD
    source, target = load_dataset("synthetic", src), load_dataset("synthetic", tgt)
    for seed in (1, 2):
        run = out / "pretrain" / f"seed{seed}"
        recs = _epochs(run / "log.jsonl")
        assert [r["epoch"] for r in recs] == [0, 1]  # rank 0 alone writes the log
        assert all(r["world_size"] == WORLD for r in recs)
        if seed == 2:
            continue  # one seed is compared; the other only feeds the MMT tests
        ref = pretrain(source, target, o, seed=seed, out_dir=tmp_path / f"seed{seed}")
        for r, q in zip(recs, _epochs(tmp_path / f"seed{seed}" / "log.jsonl")):
            for k in ("loss_ce", "loss_tri", "acc"):
                assert r[k] == pytest.approx(q[k], rel=RTOL), (seed, r["epoch"], k)
        _assert_close_state(torch.load(run / "model.pt")["model"], torch.load(ref.model_path)["model"],
                            f"seed {seed}", 2 * o.pretrain.lr * o.pretrain.epochs * o.pretrain.iters)


def _run_dump(tmp_path: Path, name: str, o, tgt: str, inits: list[str], ranks: int) -> Path:
    """DUMP_SCRIPT under torchrun (``ranks`` > 1) or as one plain process; returns the dump folder."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(asdict(o)))))
    script = tmp_path / "run_adapt.py"
    script.write_text(DUMP_SCRIPT)
    dump = tmp_path / f"dump_{name}"
    dump.mkdir()
    args = (str(script), str(cfg), tgt, str(tmp_path / name), str(dump), *inits)
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
    gradient difference (the worst case, a gradient near zero; on a float32 run TAU is ~1e-1 and
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
    dist_dump = _run_dump(tmp_path, "dist", o, tgt, inits, WORLD)
    o.run.bn_split = o.data.batch_size // WORLD
    single_dump = _run_dump(tmp_path, "single", o, tgt, inits, 1)

    last = o.adapt.epochs - 1
    ranks = [_load(dist_dump / f"rank{r}_ep{last}.pt")["steps"] for r in range(WORLD)]
    ref_steps = _load(single_dump / f"rank0_ep{last}.pt")["steps"]
    assert len(ranks[0]) == len(ranks[1]) == len(ref_steps) == o.adapt.epochs * o.adapt.iters
    for s0, s1 in zip(*ranks):
        assert torch.equal(torch.stack(s0["terms"]), torch.stack(s1["terms"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][0]["grads"], ranks[1][0]["grads"]))

    n_max = o.data.batch_size * (o.data.height // 2) * (o.data.width // 2)
    tau = 2 * 40 * n_max * 2.0**-53
    g = max(s["grad_max"] for s in ref_steps + ranks[0])
    per_step = min(2 * o.adapt.lr, 2 * o.adapt.lr * tau * g / 1e-8)  # Adam's eps: torch's default
    for a, b in zip(ranks[0][0]["grads"], ref_steps[0]["grads"]):
        assert (a - b).abs().max() <= tau * b.abs().max(), "first step's gradients"
    for t, (a, b) in enumerate(zip(ranks[0], ref_steps)):
        ta, tb = torch.stack(a["terms"]), torch.stack(b["terms"])
        if t:  # the total loss only: its gradient's L1 norm is what was recorded
            ta, tb = ta[:1], tb[:1]
        bound = tau * tb.abs() + b["grad_l1"] * per_step * t
        assert ((ta - tb).abs() <= bound).all(), (t, ta.tolist(), tb.tolist(), bound.tolist())

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
        bound = per_step * r0["global_step"]
        for i, (n0, n1, nr) in enumerate(zip(r0["nets"], r1["nets"], ref["nets"])):  # 2 students, 2 teachers
            assert n0.keys() == n1.keys() == nr.keys()
            for k in n0:
                assert torch.equal(n0[k], n1[k]), (epoch, i, k)
                if not n0[k].is_floating_point():
                    assert torch.equal(n0[k], nr[k]), (epoch, i, k)
                    continue
                assert n0[k].dtype == torch.float64, k
                diff = float((n0[k] - nr[k]).abs().max())
                assert diff <= bound * max(1.0, float(nr[k].abs().max())), (epoch, i, k, diff, bound)


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
