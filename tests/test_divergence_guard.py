"""The divergence guard (``run.diverge_factor``, docs/reliability.md): a run whose weights blow up
without a NaN stops before its checkpoint replaces the good one, naming the learning rate and
the step; its measure is the float64 norm of the trained weights, and it adds no host read.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastmmt.train import adapt, pretrain
from fastmmt.train.divergence import DivergenceError, parameter_norm
from reliability_env import adapt_args, copy_run, digest, one_line, run_cli
from synthetic_fixtures import tiny_options


@pytest.fixture
def env(tiny_run):
    return tiny_run


def test_parameter_norm_is_the_float64_norm(tmp_path):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g) * 100, torch.randn(2, 2, 2, generator=g)]
    want = torch.cat([p.double().flatten() for p in params]).pow(2).sum().sqrt()
    torch.testing.assert_close(parameter_norm(params), want, rtol=1e-6, atol=0)


def test_diverging_run_stops_before_its_checkpoint_replaces_the_good_one(env, capsys, tmp_path):
    run = copy_run(env, tmp_path)
    ckpt = run / "kmeans" / "ckpt"
    before = digest(ckpt)
    # one zero too many, and more: Adam moves every weight by about lr per step, the loss stays finite
    rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=2", "adapt.lr=10.0", extra=("--resume",)))
    one_line(rc, err, "diverging at epoch 1 iteration", "global step", "adapt.lr=10", "lower it")
    assert "non-finite" in err and "non-finite loss (" not in err  # not the NaN guard
    assert digest(ckpt) == before  # epoch 0's checkpoint is still the last one
    assert [json.loads(x).get("epoch") for x in (run / "kmeans" / "log.jsonl").read_text().splitlines()] == \
        [0, None]  # epoch 0 and the final record of the first run, nothing of the diverged epoch
    # the guard is what stopped it: off, the same run writes the blown-up epoch over the good one
    rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=2", "adapt.lr=10.0", "run.diverge_factor=0",
                                       extra=("--resume",)))
    assert rc == 0, err
    assert torch.load(ckpt / "last.pt", weights_only=False)["epoch"] == 1


def test_the_guard_adds_no_host_read(env, tmp_path, monkeypatch):
    """Host reads (tolist, item, float, int, bool, numpy of a tensor) inside ``train_epoch`` of
    a pre-training and an MMT run with the guard on and off: the same count, since its measure
    travels with the loss sums and its message is built only when it fires."""
    counts = {"n": 0}
    for name in ("tolist", "item", "__float__", "__bool__", "__int__", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            counts["n"] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    import fastmmt.train.loop as loop
    real_epoch, inside, seen = loop.train_epoch, {"n": 0}, []

    def measured(*a, **k):
        n0 = counts["n"]
        out = real_epoch(*a, **k)
        inside["n"] += counts["n"] - n0
        return out
    monkeypatch.setattr(loop, "train_epoch", measured)
    for factor in (10.0, 0.0):
        o = tiny_options(tmp_path)
        o.pretrain.iters, o.adapt.epochs, o.adapt.iters, o.run.log_every, o.run.eval_every = 4, 1, 4, 2, 0
        o.run.diverge_factor = factor
        inside["n"] = 0
        pretrain(env["source"], env["target"], o, seed=1, out_dir=tmp_path / f"p{factor}")
        adapt(env["target"], env["inits"], o, tmp_path / f"a{factor}")
        seen.append(inside["n"])
    assert seen[0] == seen[1] > 0, seen


@pytest.mark.parametrize("sync_each_step", [False, True])
def test_diverging_pretraining_stops_naming_its_learning_rate(env, tmp_path, sync_each_step):
    """Pre-training, with the sync-free step and with the old one (which reads every step and
    checks the guard on its own read): stopped before any checkpoint or model file."""
    o = tiny_options(tmp_path)
    o.pretrain.lr, o.pretrain.warmup_epochs, o.run.eval_every = 10.0, 0, 0
    o.run.sync_each_step = sync_each_step
    with pytest.raises(DivergenceError, match=r"diverging at pre-training epoch 0 iteration 1 .*"
                                              r"\(pretrain\.lr=10, 10 in this epoch\)"):
        pretrain(env["source"], env["target"], o, seed=1, out_dir=tmp_path / "p")
    assert not (tmp_path / "p" / "ckpt").exists() and not (tmp_path / "p" / "model.pt").exists()
    assert not (tmp_path / "p" / ".fastmmt.lock").exists()
