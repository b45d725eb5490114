"""The recipe as the official MMT code ran it: Stage I learning-rate timing, BN adaptation order,
the source-best checkpoint, the best of both teachers, k-means restarts, official release files
through --init / evaluate --model, and `fastmmt visualize`."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fastmmt.train.mmt as mmt_mod
from fastmmt.cli import main as cli_main
from fastmmt.cli.config import load_options
from fastmmt.data import load_dataset
from fastmmt.data.loaders import TrainBatch
from fastmmt.ops import reference as ref
from fastmmt.train import adapt, evaluate_model_file, load_model_file, pretrain
from fastmmt.train.optim import adam, adam_impl
from fastmmt.models.factory import make_model
from fastmmt.train.update import StepContext
from fastmmt.train.distributed import DistContext
from fastmmt.train.epoch_hooks import evaluate_epoch
from fastmmt.train.stage import RunState
from fastmmt.train.options import PretrainOptions
from fastmmt.train.pretrain import lr_factor, pretrain_step
from fastmmt.train.runtime import Runtime
from synthetic_fixtures import tiny_options

ROOT = Path(__file__).resolve().parents[1]


# --- item 2: Stage I learning-rate timing ----------------------------------------------------------
@pytest.mark.parametrize("epoch,official,after", [
    (0, 0.01 * 0.9 + 0.1, 0.01),          # official: the factor of epoch 1 (0.109)
    (8, 0.01 * 0.1 + 0.9, 0.01 * 0.2 + 0.8),
    (9, 1.0, 0.01 * 0.1 + 0.9),           # official: the full rate from epoch 9
    (38, 1.0, 1.0), (39, 0.1, 1.0), (40, 0.1, 0.1),
    (68, 0.1, 0.1), (69, 0.01, 0.1), (70, 0.01, 0.01), (79, 0.01, 0.01)])
def test_lr_factor_timings_hand_values(epoch, official, after):
    p = PretrainOptions()
    assert lr_factor(PretrainOptions(lr_timing="official"))(epoch) == pytest.approx(official, rel=1e-12)
    assert lr_factor(p)(epoch) == pytest.approx(after, rel=1e-12)  # the default stays "after_epoch"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the official order
def test_official_scheduler_equals_stepping_at_the_start_of_each_epoch():
    """A warm-up scheduler stepped at the START of each epoch (the official loop), against
    fastmmt's LambdaLR stepped after each epoch with lr_timing=official."""
    p = PretrainOptions(lr_timing="official")
    w = nn.Parameter(torch.zeros(1))

    def start_stepped(e_count):  # the official loop: sched.step() first, then train epoch e
        opt = torch.optim.SGD([w], lr=1.0)
        base = lambda e: (0.01 * (1 - e / 10) + e / 10 if e < 10 else 1.0) * 0.1 ** ((e >= 40) + (e >= 70))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, base)
        out = []
        for _ in range(e_count):
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(p))
    ours = []
    for _ in range(80):
        ours.append(opt.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(ours, start_stepped(80), rtol=1e-12)


# --- item 4: BN adaptation before backward, on the pre-step weights -----------------------------------
def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_target_bn_forward_runs_before_the_update():
    o = tiny_options(Path("unused"))
    o.run.device = "cpu"
    torch.manual_seed(0)
    model = make_model(o.model, 5, torch.device("cpu"))
    model.train()
    before = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    xs, xt = torch.randn(16, 3, 32, 16, generator=g), 2.0 + 3.0 * torch.randn(16, 3, 32, 16, generator=g)
    y = torch.arange(4).repeat_interleave(4) % 5
    src = TrainBatch((xs,), y, torch.zeros(16, dtype=torch.long), torch.arange(16))
    tgt = TrainBatch((xt,), y, torch.zeros(16, dtype=torch.long), torch.arange(16))
    rt = Runtime(o, DistContext(device=torch.device("cpu")), 0)
    opt = adam([model], 1e-2, 5e-4, adam_impl(o.run))  # the Adam Stage I builds
    out = pretrain_step(StepContext([model], [model], opt, o, rt), src, tgt, "test")
    assert bool(out["finite"])

    # the official order, by hand: source forward, target forward (pre-step weights), backward, step
    exp = copy.deepcopy(before)
    exp_opt = torch.optim.Adam([q for q in exp.parameters() if q.requires_grad], lr=1e-2, weight_decay=5e-4)
    f, logits = exp(xs)
    loss = ref.cross_entropy_label_smooth(logits, y, 0.1) + ref.softmax_triplet_loss(f, y)
    with torch.no_grad():
        exp(xt)
    exp_opt.zero_grad()
    loss.backward()
    exp_opt.step()
    for k, v in _bn_stats(exp).items():
        torch.testing.assert_close(_bn_stats(model)[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for (k, a), b in zip(model.named_parameters(), exp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)

    # the old order (target forward on the updated weights) leaves other statistics: the test can tell
    old = copy.deepcopy(before)
    old_opt = torch.optim.Adam([q for q in old.parameters() if q.requires_grad], lr=1e-2, weight_decay=5e-4)
    f, logits = old(xs)
    loss = ref.cross_entropy_label_smooth(logits, y, 0.1) + ref.softmax_triplet_loss(f, y)
    old_opt.zero_grad()
    loss.backward()
    old_opt.step()
    with torch.no_grad():
        old(xt)
    key = "backbone.layer1.0.bn2.running_mean"
    assert (_bn_stats(old)[key] - _bn_stats(model)[key]).abs().max() > 1e-4


# --- item 5: the best of both mean teachers ---------------------------------------------------------
class _FakeStage:
    def __init__(self, scores):
        self.scores, self.epoch = scores, 0
        self.nets = {"T1": nn.Linear(1, 1), "T2": nn.Linear(1, 1)}

    def eval_models(self):
        return self.nets

    def evaluate(self, net):
        name = "T1" if net is self.nets["T1"] else "T2"
        m = self.scores[self.epoch][name]
        return {"mAP": m, "rank1": m + 0.01, "rank5": m + 0.02, "rank10": m + 0.03, "eval_seconds": 0.0}

    def model_file(self, name, **extra):
        return {"weights_of": name, **extra}


def test_select_best_over_epochs_and_both_teachers(tmp_path):
    scores = [{"T1": 0.30, "T2": 0.35},   # epoch 0: T2 best so far
              {"T1": 0.40, "T2": 0.40},   # epoch 1: a tie between teachers: T2 (the official rule)
              {"T1": 0.40, "T2": 0.39},   # epoch 2: equal to the best, not better: stays epoch 1
              {"T1": 0.38, "T2": 0.20}]
    stage, st = _FakeStage(scores), RunState()
    rt = Runtime(None, DistContext(device=torch.device("cpu")), 0)
    winners = []
    for epoch in range(len(scores)):
        stage.epoch = epoch
        record = {}
        evaluate_epoch(stage, epoch, st, record, tmp_path, rt, True, ("T1", "T2"))
        assert record["mAP"] == scores[epoch]["T1"] and record["T2_mAP"] == scores[epoch]["T2"]
        # the official script's per-epoch figure, the better teacher, logged beside them
        assert record["max_mAP"] == max(scores[epoch]["T1"], scores[epoch]["T2"])
        winners.append((st.best["epoch"], st.best["model"]))
    assert winners == [(0, "T2"), (1, "T2"), (1, "T2"), (1, "T2")]
    assert st.best["rank1"] == pytest.approx(0.41)
    saved = torch.load(tmp_path / "best.pt")
    assert saved == {"weights_of": "T2", "epoch": 1, "network": "T2"}
    # a clear winner among teachers: T1 when it is strictly better
    stage, st = _FakeStage([{"T1": 0.5, "T2": 0.4}]), RunState()
    evaluate_epoch(stage, 0, st, {}, tmp_path, rt, True, ("T1", "T2"))
    assert st.best["model"] == "T1"


# --- end to end on the tiny synthetic domains -------------------------------------------------------
@pytest.fixture(scope="module")
def domains(tiny_folders):
    src, tgt = tiny_folders
    return load_dataset("synthetic", src), load_dataset("synthetic", tgt)


@pytest.fixture(scope="module")
def source_best_run(domains, tmp_path_factory):
    source, target = domains
    out = tmp_path_factory.mktemp("pre")
    o = tiny_options(out)
    o.pretrain.epochs, o.pretrain.eval_every = 3, 1
    o.pretrain.select, o.pretrain.lr_timing = "source_best", "official"
    res = pretrain(source, target, o, seed=1, out_dir=out / "seed1")
    return o, out / "seed1", res


def test_pretrain_official_lr_and_source_best(domains, source_best_run):
    source, _ = domains
    o, out, res = source_best_run
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if not r.get("final")]
    # lr of epoch e is lr * factor(e + 1), warm-up over 1 epoch here: full rate from epoch 0
    base = o.pretrain.lr
    expected = [base * lr_factor(o.pretrain)(e) for e in range(3)]
    np.testing.assert_allclose([r["lr"] for r in epochs], expected, rtol=1e-9)
    assert expected[0] == pytest.approx(base)  # (1 - 1/1) * 0.01 + 1: the factor of epoch 1
    # every epoch evaluated on the source test set; the first strictly best one is model.pt
    maps = [r["source_mAP"] for r in epochs]
    best = int(np.argmax(maps))  # argmax = the first of equal maxima, as the strict rule
    saved = torch.load(res.model_path, weights_only=False)
    assert saved["select"] == "source_best" and saved["epoch"] == best
    assert saved["source_mAP"] == pytest.approx(maps[best])
    assert recs[-1]["final"] and recs[-1]["selected_epoch"] == best
    # independently: the saved model re-evaluated on the source test set gives that epoch's mAP
    again = evaluate_model_file(res.model_path, source, o)
    assert again["mAP"] == pytest.approx(maps[best], abs=1e-6)


def test_source_best_needs_a_source_test_set(domains, tmp_path):
    source, target = domains
    o = tiny_options(tmp_path)
    o.pretrain.select = "source_best"
    bare = copy.copy(source)
    bare.query, bare.gallery = [], []
    with pytest.raises(ValueError, match="source test set.*pretrain.select=last"):
        pretrain(bare, target, o, seed=1, out_dir=tmp_path / "x")


def _official_copy(model_path: Path, out: Path) -> Path:
    """A fastmmt model file rewritten in the official release's layout by module order (as in
    tests/test_models_official.py), without the converter."""
    saved = torch.load(model_path, weights_only=False)
    o = tiny_options(out)
    net = make_model(o.model, saved["num_classes"], torch.device("cpu"))
    net.load_state_dict(saved["model"])
    b = net.backbone

    class Official(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Sequential(b.conv1, b.bn1, nn.MaxPool2d(3, 2, 1), b.layer1, b.layer2, b.layer3, b.layer4)
            self.feat_bn, self.classifier = net.bn_neck, net.classifier

    class DP(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = Official()

    path = out / "model_best.pth.tar"
    torch.save({"state_dict": DP().state_dict(), "epoch": 3, "best_mAP": np.float64(0.5)}, path)
    return path


def test_official_files_through_evaluate_init_and_visualize(domains, source_best_run, tmp_path, capsys,
                                                            monkeypatch):
    _, target = domains
    o, out, res = source_best_run
    official = _official_copy(Path(res.model_path), tmp_path)
    # evaluate --model: the converted official file gives the fastmmt file's metrics
    a = evaluate_model_file(res.model_path, target, o)
    b = evaluate_model_file(official, target, o)
    for k in ("mAP", "rank1", "rank5", "rank10"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
    m1, m2 = load_model_file(res.model_path, o, torch.device("cpu")), load_model_file(official, o, torch.device("cpu"))
    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(m2.eval()(x), m1.eval()(x), rtol=0, atol=0)
    bad = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="neither a fastmmt model file.*nor an official MMT release file"):
        load_model_file(bad, o, torch.device("cpu"))

    # adapt --init with two official files, select_best over both teachers, k-means options reach FAISS
    seen = {}
    real = mmt_mod.build_clusterer

    def spy(method, **kw):
        seen.update(kw, method=method)
        return real(method, **kw)

    monkeypatch.setattr(mmt_mod, "build_clusterer", spy)
    o2 = copy.deepcopy(o)
    o2.adapt.kmeans_restarts, o2.adapt.kmeans_iters, o2.adapt.kmeans_seed_dim = 2, 7, 16
    o2.run.select_best, o2.run.eval_every = True, 1
    r = adapt(target, [str(official), str(official)], o2, tmp_path / "kmeans")
    assert (seen["method"], seen["nredo"], seen["niter"], seen["seed_dim"]) == ("kmeans", 2, 7, 16)
    recs = [json.loads(x) for x in (tmp_path / "kmeans" / "log.jsonl").read_text().splitlines() if '"final"' not in x]
    # the winner, computed here from the log: best over epochs (strict) and teachers (T2 on a tie)
    best_map, best = -1.0, None
    for rec in recs:
        name, m = ("T2", rec["T2_mAP"]) if rec["T2_mAP"] >= rec["mAP"] else ("T1", rec["mAP"])
        if m > best_map:
            best_map, best = m, (rec["epoch"], name)
    assert (r.metrics["epoch"], r.metrics["model"]) == best and r.metrics["mAP"] == pytest.approx(best_map)
    assert torch.load(tmp_path / "kmeans" / "best.pt", weights_only=False)["network"] == best[1]

    # fastmmt visualize on the official file
    args = ["visualize", "--config", str(ROOT / "configs" / "demo.yaml"), "--data-root", "unused",
            "--set", f"data.target_root={target.root}", "--set", "data.height=32", "--set", "data.width=16",
            "--set", "model.base_width=8", "--model", str(official), "--out", str(tmp_path / "vis"),
            "--num-queries", "3", "--topk", "4", "--rerank", "--no-progress"]
    assert cli_main(args) == 0
    pngs = sorted((tmp_path / "vis").glob("*.png"))
    assert len(pngs) == 3
    w, h = Image.open(pngs[0]).size
    assert (w, h) == (128 + 30 + 4 * 128 + 3 * 8, 2 * (16 + 256) + 12)  # default layout, two rows


def test_paper_configs_state_the_official_values():
    for path in (ROOT / "configs").glob("*_*.yaml"):
        if path.name.startswith("_") or path.name == "demo.yaml":
            continue
        o = load_options(path)
        assert (o.pretrain.lr_timing, o.pretrain.select, o.pretrain.eval_every) == ("official", "source_best", 40)
        assert (o.adapt.kmeans_restarts, o.adapt.kmeans_iters) == (10, 300)
        assert o.adapt.cluster_backend == "sklearn"  # the official code's KMeans
        assert o.adapt.kmeans_seed_dim is None  # with faiss: k-means++ in the full space, as scikit-learn
        assert o.data.backend == "torch"  # PIL's bicubic resize, as the official transforms
        assert not o.run.select_best  # the default report: last-epoch teacher 1
    d = load_options(ROOT / "configs" / "demo.yaml")
    assert (d.pretrain.lr_timing, d.pretrain.select, d.adapt.kmeans_restarts, d.adapt.kmeans_iters,
            d.adapt.kmeans_seed_dim, d.adapt.cluster_backend) == ("after_epoch", "last", 1, 100, 256, "auto")
