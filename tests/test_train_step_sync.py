"""The training steps read no tensor value on the host (default configuration, CPU).

Every way Python reads a tensor's value (``item``, ``__float__``, ``__int__``, ``__index__``,
``__bool__``, ``tolist``) is patched to raise while several steps of ``mmt_step``,
``baseline_step`` and ``pretrain_step`` run and their loss terms are accumulated by the
runner's :class:`DeviceMeter`; the values are read only afterwards, once. A non-finite step is
refused on the device: no weight, no optimiser state and (``skip``) no mean teacher changes.
"""
import contextlib
import sys

import numpy as np
import pytest
import torch

import fastmmt.train.mmt as mmt_mod
from fastmmt.data.loaders import TrainBatch
from fastmmt.train.mean_teacher import MeanTeacher, ema_alpha
from fastmmt.train.optim import adam, adam_impl
from fastmmt.models.factory import make_model
from fastmmt.train.distributed import DistContext
from fastmmt.train.loop import FINITE, DeviceMeter
from fastmmt.train.update import NonFiniteLossError, StepContext, check_window
from fastmmt.train.options import ExperimentOptions
from fastmmt.train.pretrain import pretrain_step
from fastmmt.train.runtime import Runtime

READS = ("item", "__float__", "__int__", "__index__", "__bool__", "tolist")


@contextlib.contextmanager
def no_host_reads(allowed_reads: list | None = None):
    """Any read of a tensor's value on the host raises inside the block, but one: torch's
    ``foreach``/loop Adam reads its step counters with ``_get_value``. Those counters are host
    tensors by design (torch keeps them on the CPU unless the optimiser is fused or capturable),
    so the read is no device sync; each such read is recorded in ``allowed_reads`` for the test
    to check that it was an optimiser step counter and nothing else."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if (name == "item" and allowed_reads is not None and caller.f_code.co_name == "_get_value"
                    and caller.f_globals.get("__name__") == "torch.optim.optimizer"):
                allowed_reads.append(self)
                return saved[name](self, *args, **kwargs)
            raise AssertionError(f"host read: Tensor.{name} in a training step")
        return read
    try:
        for name in READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _opts(**run) -> ExperimentOptions:
    o = ExperimentOptions()
    o.model.arch, o.model.base_width = "resnet18", 8
    o.data.batch_size, o.data.num_instances = 8, 4
    o.run.loss_backend = "torch"  # the Triton interpreter itself reads values; the kernels do not
    o.run.bn_split, o.run.fused_bn_split = 4, True  # the one-pass split BN in the step as well
    for k, v in run.items():
        setattr(o.run, k, v)
    return o


def _batch(gen, k: int, views: int = 2) -> TrainBatch:
    x = [torch.randn(8, 3, 32, 16, generator=gen) for _ in range(views)]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]) + torch.randint(0, k - 1, (1,), generator=gen)
    return TrainBatch(tuple(x), labels, torch.zeros(8, dtype=torch.int64), torch.arange(8))


def _nets(o, k=5):
    torch.manual_seed(0)
    return [make_model(o.model, k, torch.device("cpu"), o.run.bn_split, fused_bn_split=True) for _ in range(2)]


def _nan_at(bad_steps, real):
    calls = [0]

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        return out._replace(total=out.total * float("nan")) if calls[0] - 1 in bad_steps else out
    return poisoned


def _params(nets):
    return [p.detach().clone() for n in nets for p in n.parameters()]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_mmt_steps_read_nothing_on_the_host(policy, gen, monkeypatch):
    o = _opts(on_nonfinite=policy)
    rt = Runtime(o, DistContext(device=torch.device("cpu")), 0)
    students = _nets(o)
    mt = MeanTeacher(students, o.adapt.ema_alpha, o.run.ema_backend, device_step=policy == "skip")
    teachers = mt.teachers
    opt = adam(students, 1e-3, 5e-4, adam_impl(o.run))
    assert adam_impl(o.run) == ("fused" if policy == "skip" else "foreach")
    reads = []
    batches = [_batch(gen, 5) for _ in range(4)]
    monkeypatch.setattr(mmt_mod, "mmt_loss", _nan_at({2}, mmt_mod.mmt_loss))
    meter = DeviceMeter(torch.device("cpu"), skip=policy == "skip")
    snaps = []
    sc = StepContext(students, students, opt, o, rt, mt)
    with no_host_reads(reads):
        for it, b in enumerate(batches):
            out = mmt_mod.mmt_step(sc, b, it)
            meter.add(it, out)
            snaps.append((_params(students), _params(teachers)))
    w = meter.read()  # the one host read of the window
    assert w["first_bad"] == 2 and np.isnan(w["bad_loss"])
    # skip: only step 2 was refused; stop applied it, so step 3 (NaN weights) is bad as well
    assert (w["bad"], w["finite"]) == ((1, 3) if policy == "skip" else (2, 2))
    steps = {id(st["step"]) for st in opt.state.values()}
    assert all(id(t) in steps and t.device.type == "cpu" for t in reads)  # Adam's host counters only
    if policy == "skip":
        assert not reads  # the fused Adam keeps its counters on the device
        # the refused step 2 changed no student weight (the fused optimiser's found_inf), no
        # teacher (alpha 1), and neither the optimiser's nor the mean teacher's step count
        assert all(torch.equal(a, b) for a, b in zip(snaps[1][0], snaps[2][0]))
        assert all(torch.equal(a, b) for a, b in zip(snaps[1][1], snaps[2][1]))
        assert not all(torch.equal(a, b) for a, b in zip(snaps[2][0], snaps[3][0]))
        assert opt.state[next(iter(students[0].parameters()))]["step"] == 3
        assert mt.step == 3
    else:  # stop: the step was applied; the run ends at this read, before anything is written
        assert reads and not all(torch.isfinite(p).all() for p in snaps[3][0])
    assert sc.info["ema_backend"] in ("ext", "foreach")
    # skip leaves the refused step out of every sum; stop sums everything (the run ends anyway)
    assert all(np.isfinite(v) for v in w["sums"].values()) == (policy == "skip")
    describe = lambda it: f"epoch 0 iteration {it} (global step {it})"  # noqa: E731
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 0 iteration 2 "
                                                     r"\(global step 2\); 2 of the steps of iterations 0-3"):
            check_window(w, 0, 3, "stop", describe, 4)
    else:
        check_window(w, 0, 3, "skip", describe, 4)


def test_skip_mean_teacher_follows_the_applied_steps(gen, monkeypatch):
    """After a refused step the device-side alpha is that of the applied-step count: the teachers
    equal a hand-rolled float64 EMA of the students' weights after each applied step."""
    o = _opts(on_nonfinite="skip")
    rt = Runtime(o, DistContext(device=torch.device("cpu")), 0)
    students = _nets(o)
    mt = MeanTeacher(students, o.adapt.ema_alpha, o.run.ema_backend, device_step=True)
    teachers = mt.teachers
    opt = adam(students, 1e-3, 5e-4, adam_impl(o.run))
    monkeypatch.setattr(mmt_mod, "mmt_loss", _nan_at({1}, mmt_mod.mmt_loss))
    expect = [p.detach().double().clone() for t in teachers for p in t.parameters()]
    applied = 0
    for it in range(4):
        mmt_mod.mmt_step(StepContext(students, students, opt, o, rt, mt), _batch(gen, 5), it)
        if it == 1:
            continue
        a = ema_alpha(applied, o.adapt.ema_alpha)
        s = [p.detach().double() for n in students for p in n.parameters()]
        expect = [a * e + (1 - a) * x for e, x in zip(expect, s)]
        applied += 1
    got = [p.detach().double() for t in teachers for p in t.parameters()]
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_baseline_and_pretrain_steps_read_nothing_on_the_host(gen):
    o = _opts()
    rt = Runtime(o, DistContext(device=torch.device("cpu")), 0)
    student, _ = _nets(o)
    opt = adam([student], 1e-3, 5e-4, adam_impl(o.run))
    base, pre = (DeviceMeter(torch.device("cpu"), skip=False) for _ in range(2))
    before = _params([student])
    reads = []
    with no_host_reads(reads):
        for it in range(3):
            sc = StepContext([student], [student], opt, o, rt)
            base.add(it, mmt_mod.baseline_step(sc, _batch(gen, 5, 1)))
            out = pretrain_step(sc, _batch(gen, 5, 1), _batch(gen, 5, 1))
            pre.add(it, out)
    for w in (base.read(), pre.read()):
        assert w["finite"] == 3 and w["bad"] == 0 and w["first_bad"] == -1
        assert w["sums"]["loss"] == pytest.approx(w["sums"]["loss_ce"] + w["sums"]["loss_tri"], rel=1e-6)
    assert 0.0 <= w["sums"]["acc"] <= 3.0
    steps = {id(st["step"]) for st in opt.state.values()}
    assert reads and all(id(t) in steps for t in reads)
    assert not all(torch.equal(a, b) for a, b in zip(before, _params([student])))
    assert isinstance(out[FINITE], torch.Tensor) and out["loss"].dim() == 0


def test_the_patch_catches_a_read():
    """The patch itself works: the old step's finite check reads the loss and is caught."""
    from fastmmt.train.update import step_is_finite

    with no_host_reads(), pytest.raises(AssertionError, match="host read"):
        step_is_finite(torch.tensor(1.0), "x")


def test_triton_label_check_is_skippable_but_still_the_default(gen, monkeypatch, device):
    """The loss ops keep their label-range error for direct users; ``check_labels=False`` (the
    trainer, which checks once per epoch) skips the reduction and its host read."""
    from fastmmt.ops import cross_entropy_label_smooth, logits_pair_losses
    from fastmmt.ops import reference as ref

    s, t = (torch.randn(6, 5, generator=gen).to(device) for _ in range(2))
    y = torch.tensor([0, 1, 2, 3, 4, 0], device=device)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        cross_entropy_label_smooth(s, torch.tensor([0, 1, 2, 3, 5, 0], device=device), backend="triton")

    def no_aminmax(*args, **kwargs):
        raise AssertionError("label range checked")
    monkeypatch.setattr(torch, "aminmax", no_aminmax)
    ce, se = logits_pair_losses(s, t, y, 0.1, backend="triton", check_labels=False)
    ce_ref, se_ref = ref.logits_pair_losses(s.double().cpu(), t.double().cpu(), y.cpu(), 0.1)
    torch.testing.assert_close(ce.double().cpu(), ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(se.double().cpu(), se_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="label range checked"):
        cross_entropy_label_smooth(s, y, backend="triton")
