"""A tiny end-to-end run of the training stages on generated data (CI-sized).

Pre-train 1 epoch, adapt 2 epochs of 2 iterations with k-means and DBSCAN, the baseline, resume,
and the mean-teacher update checked against a hand-rolled float64 update at every step.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmmt.train.mmt as mmt_mod
from fastmmt.cli import main as cli_main
from fastmmt.data import load_dataset
import fastmmt.train.mean_teacher as mean_teacher_mod
from fastmmt.train.mean_teacher import ema_alpha
from fastmmt.train import adapt, pretrain
from synthetic_fixtures import tiny_options


@pytest.fixture(scope="module")
def domains(tiny_folders):
    src, tgt = tiny_folders
    return load_dataset("synthetic", src), load_dataset("synthetic", tgt)


@pytest.fixture(scope="module")
def pretrained(domains, tmp_path_factory):
    source, target = domains
    out = tmp_path_factory.mktemp("run")
    o = tiny_options(out)
    paths = []
    for s in (1, 2):
        res = pretrain(source, target, o, seed=s, out_dir=out / f"seed{s}")
        assert Path(res.model_path).is_file()
        assert set(res.metrics) == {"mAP", "rank1", "rank5", "rank10"}
        assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
        recs = [json.loads(x) for x in (out / f"seed{s}" / "log.jsonl").read_text().splitlines()]
        assert recs[0]["epoch"] == 0 and recs[0]["loss_ce"] > 0
        paths.append(res.model_path)
    return out, paths


def _snap(nets):
    return [{k: v.detach().double().clone() for k, v in n.state_dict().items()} for n in nets]


def test_kmeans_mmt_teacher_is_ema_of_student_and_resume_continues(domains, pretrained, monkeypatch):
    _, target = domains
    out, inits = pretrained
    o = tiny_options(out)
    o.adapt.epochs = 1
    real = mean_teacher_mod.ema_update_module_
    steps = []

    def checked(teachers, students, alpha, backend="auto"):
        before_t, before_s = _snap(teachers), _snap(students)
        ran = real(teachers, students, alpha, backend=backend)
        assert alpha == pytest.approx(ema_alpha(len(steps) + offset[0], o.adapt.ema_alpha))
        for t, bt, bs in zip(teachers, before_t, before_s):
            params = dict(t.named_parameters())
            for k, v in t.state_dict().items():
                if k in params:   # hand-rolled update of every parameter (classifier included)
                    torch.testing.assert_close(v.double(), alpha * bt[k] + (1 - alpha) * bs[k], rtol=1e-5, atol=1e-6)
                else:             # buffers (BN running stats) are the teacher's own, untouched
                    assert torch.equal(v.double(), bt[k]), k
        # the teachers' BN statistics are their own: equal to the students' only while the
        # parameters were equal (steps 0 and 1: alpha(0) = 0 copied the student), different after
        tm = teachers[0].state_dict()["bn_neck.running_mean"]
        sm = students[0].state_dict()["bn_neck.running_mean"]
        if len(steps) + offset[0] >= 2:
            assert not torch.equal(tm, sm)
        steps.append(alpha)
        return ran

    offset = [0]
    monkeypatch.setattr(mean_teacher_mod, "ema_update_module_", checked)
    run = out / "kmeans"
    res = adapt(target, inits, o, run)
    assert len(steps) == 2 and steps[0] == 0.0
    assert (run / "pseudo_labels.npy").is_file() and (run / "ckpt" / "last.pt").is_file()
    labels = np.load(run / "pseudo_labels.npy")
    assert labels.shape == (len(target.train),) and set(labels.tolist()) == set(range(6))
    assert (run / "curves.png").stat().st_size > 0 and (run / "model.pt").is_file()
    assert 0.0 <= res.metrics["mAP"] <= 1.0
    # resume: a second epoch continues from the checkpoint with the global step carried on
    o.adapt.epochs = 2
    offset[0] = 2
    steps.clear()
    adapt(target, inits, o, run, resume=True)
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "epoch" in json.loads(x)]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[-1]["global_step"] == 4 and len(steps) == 2
    ck = torch.load(run / "ckpt" / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["global_step"] == 4
    assert recs[-1]["ema_backend"] in ("ext", "foreach")


def test_dbscan_and_baseline_run(domains, pretrained):
    _, target = domains
    out, inits = pretrained
    o = tiny_options(out)
    o.adapt.method = "dbscan"
    o.data.batch_size = 8  # P = 2: 1-epoch features give DBSCAN only a few clusters
    res = adapt(target, inits, o, out / "dbscan")
    rec = [json.loads(x) for x in (out / "dbscan" / "log.jsonl").read_text().splitlines() if "epoch" in json.loads(x)][-1]
    labels = np.load(out / "dbscan" / "pseudo_labels.npy")
    assert rec["num_clusters"] == labels.max() + 1 >= 1
    assert rec["num_outliers"] == int((labels < 0).sum())
    assert 0.0 <= res.metrics["mAP"] <= 1.0
    o.adapt.method = "baseline"
    res = adapt(target, inits[:1], o, out / "baseline")
    assert 0.0 <= res.metrics["rank1"] <= 1.0


def test_oracle_trains_on_the_true_identities(domains, pretrained):
    _, target = domains
    out, inits = pretrained
    o = tiny_options(out)
    o.adapt.method = "oracle"
    with pytest.raises(ValueError, match="method oracle needs 2 pre-trained model"):
        adapt(target, inits[:1], o, out / "oracle")
    res = adapt(target, inits, o, out / "oracle")
    pids = np.array([x.pid for x in target.train])
    labels = np.load(out / "oracle" / "pseudo_labels.npy")
    # the labels are the true ids renumbered: same partition, one class per identity
    assert len(set(zip(labels.tolist(), pids.tolist()))) == len(set(pids.tolist())) == labels.max() + 1
    rec = [json.loads(x) for x in (out / "oracle" / "log.jsonl").read_text().splitlines() if "epoch" in json.loads(x)][-1]
    assert rec["pseudo_nmi"] == pytest.approx(1.0) and rec["num_clusters"] == len(set(pids.tolist()))
    assert torch.load(res.model_path, weights_only=False)["method"] == "oracle"


def test_cli_evaluate_and_clear_errors(domains, pretrained, tmp_path, capsys):
    out, inits = pretrained
    root = Path(domains[1].root)
    args = ["--set", "data.target=synthetic", "--set", f"data.target_root={root}", "--set", "data.height=32",
            "--set", "data.width=16", "--set", "model.arch=resnet18", "--set", "model.base_width=8",
            "--set", "data.backend=torch", "--set", "data.workers=0", "--no-progress"]
    assert cli_main(["evaluate", *args, "--model", inits[0]]) == 0
    assert "mAP" in capsys.readouterr().out
    assert cli_main(["evaluate", *args, "--model", str(tmp_path / "nope.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["adapt", "--set", "adapt.method=kmeanz"]) == 2
    assert "adapt.method" in capsys.readouterr().err


def _switch_runs(target, inits, out, tmp_path, monkeypatch, bn_split):
    """k-means MMT, 2 epochs x 2 iterations, the step's switch off then on; returns the
    pseudo-labels per (run, epoch), the logged records and the last checkpoint's networks."""
    labels, run_name = {}, [""]
    real = mmt_mod._cluster

    def recording(clusterer, cf, epoch, a, d):
        res = real(clusterer, cf, epoch, a, d)
        labels[(run_name[0], epoch)] = np.asarray(res.labels).copy()
        return res
    monkeypatch.setattr(mmt_mod, "_cluster", recording)
    nets, logs = {}, {}
    for name, on in (("off", False), ("on", True)):
        o = tiny_options(out)
        o.adapt.epochs, o.adapt.iters = 2, 2
        o.run.loss_backend, o.run.deterministic, o.run.num_threads, o.run.eval_every = "torch", True, 1, 0
        o.run.bn_split = bn_split
        o.run.sync_each_step = not on
        o.data.decode_cache = o.data.persistent_loaders = on  # the data side's switches (decode once, loaders once)
        run_name[0] = name
        adapt(target, inits, o, tmp_path / name)
        nets[name] = torch.load(tmp_path / name / "ckpt" / "last.pt", weights_only=False)["nets"]
        logs[name] = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()
                      if "epoch" in json.loads(x)]
    for epoch in (0, 1):
        assert np.array_equal(labels[("off", epoch)], labels[("on", epoch)]), epoch
    for a, b in zip(logs["off"], logs["on"]):
        assert a["global_step"] == b["global_step"] and a["skipped_steps"] == b["skipped_steps"] == 0
    return logs, nets


LOSS_KEYS = ("loss", "loss_ce", "loss_tri", "loss_soft_ce", "loss_soft_tri")


@pytest.mark.parametrize("bn_split", [0, 8])
def test_fast_step_changes_no_number(domains, pretrained, monkeypatch, tmp_path, restore_torch_globals, bn_split):
    """Switch off (``run.sync_each_step``: the loss read before backward and every term after
    each step, the label check in every loss call, torch's default Adam) vs on (the default: loss
    sums on the device, read once per ``run.log_every``; the ``foreach`` Adam), without and with
    a BN split (the per-chunk loop, the default), CPU, fp32, deterministic, loss backend torch:
    the same pseudo-labels, the same losses and the same weights, bit for bit (the foreach Adam
    does the loop's arithmetic; the sums are float64 on both sides, added in the same order)."""
    _, target = domains
    out, inits = pretrained
    logs, nets = _switch_runs(target, inits, out, tmp_path, monkeypatch, bn_split=bn_split)
    for a, b in zip(logs["off"], logs["on"]):
        for k in LOSS_KEYS:
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-6), (a["epoch"], k)
    for x, y in zip(nets["off"], nets["on"]):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_one_pass_split_bn_step_changes_only_rounding(pretrained, gen):
    """``run.fused_bn_split`` on the real MMT step: the four networks from the pre-trained files
    with the one-pass split BN vs the chunk loop (``run.bn_split`` 8 of 16), one batch, the MMT
    loss (torch backend): the statistics are summed in another order, so the loss terms agree to
    float32 rounding carried through the network: relative 4e-6, about 32 float32 ulps (measured
    up to 6e-7 over 6 seeds; the triplet distances lose digits to cancellation between squared
    norms), and every gradient to 1e-4 of its tensor's largest value (measured up to 1.4e-5).

    Not claimed: equal weights after several steps. Adam's first steps are close to
    ``lr * sign(gradient)``, so an element whose gradient is near 0 can move by up to ``2 * lr``
    from an ulp of difference; with the pre-trained models of tests/test_distributed.py that moved
    the epoch's mean loss by 2e-3 relative after 2 steps. This is why the loop, which matches
    per-rank BN in a distributed run bit for bit, stays the default.
    """
    from fastmmt.ops import mmt_loss
    from fastmmt.train.model_file import load_model_file

    _, inits = pretrained
    o = tiny_options(Path("."))
    o.run.bn_split = 8
    x1 = torch.randn(16, 3, 32, 16, generator=gen)
    x2 = torch.randn(16, 3, 32, 16, generator=gen)
    y = torch.arange(4).repeat_interleave(4)
    res = {}
    for fused in (False, True):
        o.run.fused_bn_split = fused
        s1, s2 = (load_model_file(p, o, torch.device("cpu")).train() for p in inits)
        t1, t2 = (load_model_file(p, o, torch.device("cpu")).train() for p in inits)
        f1, p1 = s1(x1)
        f2, p2 = s2(x2)
        with torch.no_grad():
            f1t, p1t = t1(x1)
            f2t, p2t = t2(x2)
        out = mmt_loss(f1, f2, f1t, f2t, p1, p2, p1t, p2t, y, backend="torch")
        out.total.backward()
        grads = {n: q.grad.clone() for s in (s1, s2) for n, q in s.named_parameters() if q.grad is not None}
        res[fused] = ([float(v.detach()) for v in out], grads, t1.state_dict()["backbone.bn1.running_var"].clone())
    (la, ga, ra), (lb, gb, rb) = res[False], res[True]
    assert la == pytest.approx(lb, rel=4e-6)
    assert len(ga) == len(gb) > 40
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=1e-4 * float(ga[n].abs().max()) + 1e-8, msg=n)
    torch.testing.assert_close(rb, ra, rtol=1e-5, atol=1e-6)
