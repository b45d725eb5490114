"""Unit tests of the training layer's own pieces: LR schedule, bn_split, checkpoints, config, EMA."""
import errno
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmmt.cli.config import ConfigError, load_options
from fastmmt.train.mean_teacher import ema_alpha
from fastmmt.models.bn_split import SplitBatchNorm, convert_bn_split
from fastmmt.train.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_checkpoint
from fastmmt.train.schedule import warmup_multistep_factor

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("epoch,expected", [(0, 0.01), (5, 0.01 * 0.5 + 0.5), (9, 0.01 * 0.1 + 0.9),
                                            (10, 1.0), (39, 1.0), (40, 0.1), (69, 0.1), (70, 0.01), (79, 0.01)])
def test_warmup_multistep_matches_hand_values(epoch, expected):
    assert warmup_multistep_factor(epoch, (40, 70), 0.1, 0.01, 10) == pytest.approx(expected, rel=1e-12)


def test_ema_alpha_schedule():
    assert ema_alpha(0, 0.999) == 0.0          # the first update copies the student
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(10**6, 0.999) == 0.999


def test_split_batchnorm_matches_per_chunk_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    sbn = SplitBatchNorm(bn, 4)
    x = torch.randn(12, 3, 5, 4, dtype=torch.float32) * 3 + 1
    x_ref = x.clone().requires_grad_(True)
    x_op = x.clone().requires_grad_(True)
    out = sbn(x_op)
    # reference: each chunk normalised by its own biased statistics (float64)
    ref = []
    for c in x_ref.double().split(4):
        mu = c.mean((0, 2, 3), keepdim=True)
        var = c.var((0, 2, 3), unbiased=False, keepdim=True)
        ref.append((c - mu) / torch.sqrt(var + bn.eps) * bn.weight.double().view(1, -1, 1, 1)
                   + bn.bias.double().view(1, -1, 1, 1))
    ref = torch.cat(ref)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(x_op.grad.double(), x_ref.grad.double(), rtol=1e-4, atol=1e-5)
    # running statistics come from chunk 0 only (DataParallel keeps replica 0's buffers)
    c0 = x[:4]
    exp_mean = 0.9 * torch.zeros(3) + 0.1 * c0.mean((0, 2, 3))
    exp_var = 0.9 * torch.ones(3) + 0.1 * c0.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(sbn.running_mean, exp_mean)
    torch.testing.assert_close(sbn.running_var, exp_var)
    sbn.eval()
    bn.eval()
    bn.load_state_dict(sbn.state_dict())
    torch.testing.assert_close(sbn(x), bn(x))


def test_convert_bn_split_keeps_state_dict_keys_and_frozen_flags():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
    net[4].bias.requires_grad_(False)
    keys = list(net.state_dict())
    convert_bn_split(net, 2)
    assert isinstance(net[1], SplitBatchNorm) and isinstance(net[4], SplitBatchNorm)
    assert list(net.state_dict()) == keys
    assert not net[4].bias.requires_grad
    out = net(torch.randn(6, 3, 8, 8))
    assert out.shape == (6, 5)


def test_atomic_save_keeps_previous_file_on_disk_full(tmp_path, monkeypatch):
    save_checkpoint({"epoch": 0, "w": torch.ones(3)}, tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 0 and torch.equal(state["w"], torch.ones(3))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_load_checkpoint_falls_back_past_a_truncated_file(tmp_path, caplog):
    save_checkpoint({"epoch": 0}, tmp_path)
    save_checkpoint({"epoch": 1}, tmp_path)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:20])  # truncated
    with caplog.at_level("WARNING"):
        assert load_checkpoint(tmp_path)["epoch"] == 0
    assert "last.pt" in caplog.text
    (tmp_path / "prev.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "nothing-here") is None
    atomic_save({"x": 1}, tmp_path / "sub" / "a.pt")
    assert torch.load(tmp_path / "sub" / "a.pt")["x"] == 1


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapt: {kk: 3}\n")
    with pytest.raises(ConfigError, match=r"adapt\.kk.*allowed keys"):
        load_options(bad)
    with pytest.raises(ConfigError, match=r"adapt\.k: expected an integer"):
        load_options(None, ["adapt.k=many"])
    with pytest.raises(ConfigError, match=r"adapt\.method = 'spectral' is not allowed"):
        load_options(None, ["adapt.method=spectral"])
    with pytest.raises(ConfigError, match="unknown config section 'trainer'"):
        load_options(None, ["trainer.lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_options(tmp_path / "missing.yaml")


def test_paper_configs_resolve_with_base_and_overrides():
    o = load_options(ROOT / "configs" / "market2duke_ibn50a_dbscan.yaml", ["adapt.iters=10"])
    assert (o.data.source, o.data.target, o.model.arch) == ("market1501", "dukemtmc", "resnet_ibn50a")
    assert (o.adapt.method, o.adapt.k, o.adapt.k1, o.adapt.k2, o.adapt.iters) == ("dbscan", 700, 20, 6, 10)
    assert o.pretrain.milestones == (40, 70) and o.run.bn_split == 16
    for f in (ROOT / "configs").glob("*.yaml"):
        load_options(f)  # every shipped config is valid


def test_demo_config_file_equals_demo_options():
    from dataclasses import asdict

    from fastmmt.train.demo import demo_options

    o = load_options(ROOT / "configs" / "demo.yaml")
    d = demo_options()
    a, b = asdict(o), asdict(d)
    for sec in ("model", "pretrain", "adapt"):
        assert a[sec] == b[sec], sec
    for key in ("height", "width", "workers", "backend", "batch_size", "num_instances", "test_batch_size"):
        assert a["data"][key] == b["data"][key], key
    assert a["run"]["seed"] == b["run"]["seed"] and a["run"]["eval_every"] == b["run"]["eval_every"]


def test_run_logger_start_at_drops_replayed_epochs_and_final(tmp_path):
    from fastmmt.train.logger import RunLogger

    lg = RunLogger(tmp_path, tensorboard=False)
    for e in range(3):
        lg.log({"stage": "kmeans", "epoch": e, "loss": 1.0 / (e + 1)})
    lg.log({"stage": "kmeans", "final": True, "mAP": 0.5})
    lg.start_at(2)  # resuming from the checkpoint of epoch 1: epoch 2 will be logged again
    assert len(lg.records()) == 4, "nothing is dropped before the run logs"
    lg.log({"stage": "kmeans", "epoch": 2, "loss": 0.3})
    assert [(r["epoch"], r["loss"]) for r in lg.records()] == [(0, 1.0), (1, 0.5), (2, 0.3)]
    lg.start_at(0)  # a fresh run in the same folder
    lg.log({"stage": "kmeans", "epoch": 0, "loss": 2.0})
    assert lg.records() == [{"stage": "kmeans", "epoch": 0, "loss": 2.0}]
    lg.close()
    assert not list(tmp_path.glob("*.tmp"))


def test_run_logger_draws_on_its_own_thread_and_merges_waiting_redraws(tmp_path, monkeypatch):
    import threading

    from fastmmt.train.logger import RunLogger

    release, calls = threading.Event(), []
    real_plot = RunLogger.plot

    def plot(self):
        if self.out_dir != tmp_path:  # a redraw another test's logger left queued
            return real_plot(self)
        calls.append((threading.current_thread() is threading.main_thread(), len(self.records())))
        release.wait(timeout=5)  # the first redraw is held while the run logs on
        return real_plot(self)

    monkeypatch.setattr(RunLogger, "plot", plot)
    monkeypatch.setattr("fastmmt.train.logger.PLOT_INTERVAL", 0.0)  # every record asks for a redraw
    lg = RunLogger(tmp_path, tensorboard=False)
    for e in range(5):
        lg.log({"stage": "kmeans", "epoch": e, "loss": 1.0 / (e + 1)})
    assert len(lg.records()) == 5  # every record is written on the caller's thread at once
    release.set()
    lg.close()  # waits for the last redraw
    assert calls and not any(main for main, _ in calls), "the plot is drawn off the training thread"
    assert len(calls) <= 2 and calls[-1][1] == 5  # the held redraw, then one that read every record
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_run_logger_draws_a_short_run_once_at_close_and_a_long_one_every_interval(tmp_path, monkeypatch):
    """The first redraw waits PLOT_INTERVAL after the logger is made (a short run draws once, at
    close, not during its second epoch); later records redraw once the interval has passed."""
    import fastmmt.train.logger as logger_module
    from fastmmt.train.logger import RunLogger

    clock, calls = [1000.0], []
    monkeypatch.setattr(logger_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(RunLogger, "plot", lambda self: calls.append(len(self.records())))
    lg = RunLogger(tmp_path, tensorboard=False)
    clock[0] += logger_module.PLOT_INTERVAL / 2
    lg.log({"stage": "kmeans", "epoch": 0})
    lg.log({"stage": "kmeans", "epoch": 1})
    lg._plotter.submit(lambda: None).result()  # whatever was queued has run
    assert calls == []
    clock[0] += logger_module.PLOT_INTERVAL
    lg.log({"stage": "kmeans", "epoch": 2})
    lg._plotter.submit(lambda: None).result()
    assert calls == [3]
    lg.log({"stage": "kmeans", "epoch": 3})  # within the interval: drawn at close
    lg.close()
    assert calls == [3, 4]


def test_load_model_file_builds_the_saved_architecture(tmp_path, caplog):
    from fastmmt.models.factory import make_model
    from fastmmt.train.options import ExperimentOptions, ModelOptions
    from fastmmt.train.model_file import load_model_file, model_file

    net = make_model(ModelOptions(arch="resnet18", base_width=8), 7, torch.device("cpu"))
    atomic_save(model_file(net, 7), tmp_path / "model.pt")
    opts = ExperimentOptions()  # the run says resnet50, width 64
    with caplog.at_level("WARNING"):
        back = load_model_file(tmp_path / "model.pt", opts, torch.device("cpu"))
    assert "arch=resnet18" in caplog.text and back.model_options.base_width == 8
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # a file without saved options (older runs) whose weights do not fit the run's network
    atomic_save({"model": net.state_dict(), "num_classes": 7}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt does not fit model\.arch=resnet50"):
        load_model_file(tmp_path / "old.pt", opts, torch.device("cpu"))


def _split_bn_reference(x: torch.Tensor, split: int, weight, bias, eps: float) -> torch.Tensor:
    """float64: each chunk normalised by its own biased statistics."""
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = []
    for c in x.double().split(split):
        mu = c.mean(dims, keepdim=True)
        var = c.var(dims, unbiased=False, keepdim=True)
        out.append((c - mu) / torch.sqrt(var + eps) * weight.double().view(shape) + bias.double().view(shape))
    return torch.cat(out)


def _split_bn_bounds(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, split: int,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, bounds on the float32 error of split BN's output and input gradient.

    Per chunk and channel (m values, sigma = sqrt(biased var + eps), xh = (x - mean) / sigma):
    y = w xh + b and dx = (w / sigma) (g - mean(g) - xh mean(g xh)). Each sum carries a relative
    error of at most ~m float32 units (u = 2^-24). xh inherits the mean's ABSOLUTE error,
    ~m u mean|x|, so its error is ~m u (|xh| + r) with r = mean|x| / sigma (large when a chunk's
    values sit far from 0 relative to their spread). So |y error| <= c m u (|w| (1 + |xh| + r)
    + |b|) and |dx error| <= c m u (|w| / sigma) (|g| + mean|g| + (1 + |xh| + r) mean(|g|
    (1 + |xh| + r))), with c = 8 for the few rounding steps per term. Both grow with r (and the
    gradient with 1/sigma): a chunk of three nearly equal values far from 0 is where a fixed
    rtol/atol failed on some seeds."""
    u = 2.0 ** -24
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    w, b = weight.detach().double().abs().view(shape), bias.detach().double().abs().view(shape)
    outs, grads = [], []
    for c, gc in zip(x.double().split(split), g.double().split(split)):
        m = c.numel() // c.shape[1]
        sigma = torch.sqrt(c.var(dims, unbiased=False, keepdim=True) + eps)
        e = 1 + ((c - c.mean(dims, keepdim=True)) / sigma).abs() + c.abs().mean(dims, keepdim=True) / sigma
        a = gc.abs()
        outs.append(8 * m * u * (w * e + b))
        grads.append(8 * m * u * w / sigma * (a + a.mean(dims, keepdim=True) + e * (a * e).mean(dims, keepdim=True)))
    return torch.cat(outs), torch.cat(grads)


@pytest.mark.parametrize("shape,split", [((16, 5, 6, 3), 4), ((12, 7), 3), ((8, 4, 3, 5), 8), ((10, 3, 2, 2), 4)])
def test_one_pass_split_batchnorm_equals_the_chunk_loop_and_float64(shape, split, gen):
    """The one-pass forward (one var_mean, one addcmul) against the old chunk loop and a float64
    reference: outputs, input/weight/bias gradients, running statistics (chunk 0 only). (10, ...)
    with split 4 is not a multiple: the fused module falls back to the loop there."""
    bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
    fused, loop = SplitBatchNorm(bn, split, fused=True), SplitBatchNorm(bn, split, fused=False)
    x = torch.randn(shape, generator=gen) * 3 + 1
    g = torch.randn(shape, generator=gen)
    outs, grads = [], []
    for mod in (fused, loop):
        xi = x.clone().requires_grad_(True)
        out = mod(xi)
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append((xi.grad, mod.weight.grad, mod.bias.grad))
    xr = x.double().requires_grad_(True)
    w64 = bn.weight.detach().double().requires_grad_(True)
    b64 = bn.bias.detach().double().requires_grad_(True)
    ref = _split_bn_reference(xr, split, w64, b64, bn.eps)
    (ref * g.double()).sum().backward()
    out_bound, bound = _split_bn_bounds(x, g, bn.weight, bn.bias, split, bn.eps)
    for out, (gx, gw, gb) in zip(outs, grads):
        err = (out.double() - ref.detach()).abs()
        assert (err <= out_bound).all(), f"output off by {float((err / out_bound).max()):.2f}x its float32 bound"
        err = (gx.double() - xr.grad).abs()
        assert (err <= bound).all(), f"input gradient off by {float((err / bound).max()):.2f}x its float32 bound"
        torch.testing.assert_close(gw.double(), w64.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gb.double(), b64.grad, rtol=1e-4, atol=1e-4)
    # float32 against each other: only the order of summation differs
    assert ((outs[0] - outs[1]).double().abs() <= 2 * out_bound).all()  # each within the bound of float64
    assert ((grads[0][0] - grads[1][0]).double().abs() <= 2 * bound).all()  # each within the bound of float64
    dims = (0, *range(2, x.dim()))
    c0 = x[:split].double()
    exp_mean = 0.9 * bn.running_mean.double() + 0.1 * c0.mean(dims)
    exp_var = 0.9 * bn.running_var.double() + 0.1 * c0.var(dims, unbiased=True)
    for mod in (fused, loop):
        torch.testing.assert_close(mod.running_mean.double(), exp_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mod.running_var.double(), exp_var, rtol=1e-6, atol=1e-6)
        assert int(mod.num_batches_tracked) == 1


def test_one_pass_split_batchnorm_under_channels_last_and_bf16(gen):
    bn = nn.BatchNorm2d(4)
    fused, loop = SplitBatchNorm(bn, 4, fused=True), SplitBatchNorm(bn, 4, fused=False)
    x = torch.randn(8, 4, 5, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), loop(x), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    ref = _split_bn_reference(xb.float(), 4, bn.weight, bn.bias, bn.eps)
    out = fused(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 output rounding (8 bits)


def test_option_choices_are_the_librarys_lists():
    from fastmmt.cli.config import CHOICES
    from fastmmt.cluster.kmeans import KMEANS_BACKENDS
    from fastmmt.models import ARCHS
    from fastmmt.ops._dispatch import BACKENDS
    from fastmmt.ops.ema import EMA_BACKENDS
    from fastmmt.train.options import NONFINITE_POLICIES

    assert CHOICES[("adapt", "cluster_backend")] == KMEANS_BACKENDS
    assert CHOICES[("model", "arch")] == tuple(ARCHS)
    assert CHOICES[("run", "loss_backend")] == BACKENDS
    assert CHOICES[("run", "ema_backend")] == EMA_BACKENDS
    assert CHOICES[("run", "on_nonfinite")] == NONFINITE_POLICIES
    bad = "torch" if "torch" not in KMEANS_BACKENDS else "no-such-backend"
    with pytest.raises(ConfigError, match=rf"adapt\.cluster_backend = '{bad}' is not allowed"):
        load_options(None, [f"adapt.cluster_backend={bad}"])
    with pytest.raises(ConfigError, match=r"run\.log_every must be >= 1"):
        load_options(None, ["run.log_every=0"])
    with pytest.raises(ConfigError, match=r"adapt\.kmeans_seed_dim must be >= 1, got 0"):
        load_options(None, ["adapt.kmeans_seed_dim=0"])
    assert load_options(None, ["adapt.kmeans_seed_dim=null"]).adapt.kmeans_seed_dim is None
    with pytest.raises(ConfigError, match="exclude each other"):
        load_options(None, ["run.sync_bn=true", "run.bn_split=16"])
