"""MeanTeacher: MMT's alpha schedule, parameters-only updates, host and device step counts that
agree, refused steps that change nothing, no host read on the device path, checkpoint state."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmmt.train.mean_teacher import MeanTeacher, ema_alpha


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def _perturb(students: list[nn.Module], gen: torch.Generator) -> None:
    with torch.no_grad():
        for s in students:
            for p in s.parameters():
                p.add_(torch.randn(p.shape, generator=gen))


def test_alpha_schedule_by_hand():
    assert ema_alpha(0, 0.999) == 0.0 and ema_alpha(1, 0.999) == 0.5 and ema_alpha(3, 0.999) == 0.75
    assert ema_alpha(10_000, 0.999) == 0.999 and ema_alpha(4, 0.5) == 0.5
    steps = torch.tensor([0.0, 1.0, 3.0, 10_000.0], dtype=torch.float64)
    assert ema_alpha(steps, 0.999).tolist() == [0.0, 0.5, 0.75, 0.999]


def test_update_matches_the_formula_and_leaves_buffers(gen):
    students = [_net(0), _net(1)]
    mt = MeanTeacher(students, cap=0.999)
    for t, s in zip(mt.teachers, students):
        assert all(not q.requires_grad for q in t.parameters())
        assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), s.state_dict().values()))
    before = [[p.detach().double().clone() for p in t.parameters()] for t in mt.teachers]
    buffers = [[b.clone() for b in t.buffers()] for t in mt.teachers]
    _perturb(students, gen)
    with torch.no_grad():
        students[0][1].running_mean.add_(1.0)  # a student buffer: never copied into the teacher
    mt.update(students, step=3)  # alpha 0.75
    for t, s, b0, bufs in zip(mt.teachers, students, before, buffers):
        for p, q, p0 in zip(t.parameters(), s.parameters(), b0):
            torch.testing.assert_close(p.double(), 0.75 * p0 + 0.25 * q.detach().double(), rtol=0, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(t.buffers(), bufs))


def test_device_count_agrees_with_the_host_count_and_refused_steps_change_nothing(gen):
    students = [_net(2), _net(3)]
    host, dev = MeanTeacher(students, 0.9), MeanTeacher(students, 0.9, device_step=True, step=5)
    applied = 5
    for ok in [True, False, True, True, False, True]:
        _perturb(students, gen)
        before = [p.clone() for t in dev.teachers for p in t.parameters()]
        dev.update(students, ok=torch.tensor(ok))
        if ok:
            host.update(students, step=applied)
            applied += 1
        else:
            assert all(torch.equal(a, b) for a, b in zip(before, (p for t in dev.teachers for p in t.parameters())))
    assert dev.step.item() == applied
    for th, td in zip(host.teachers, dev.teachers):
        for a, b in zip(th.parameters(), td.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_device_path_reads_nothing_on_the_host():
    """On meta tensors any host read (``.item()``, a Scalar overload) raises."""
    students = [_net(4).to("meta")]
    mt = MeanTeacher(students, 0.999, backend="foreach", device_step=True, step=7)
    assert mt.step.device.type == "meta"
    assert mt.update(students, ok=torch.ones((), dtype=torch.bool, device="meta")) == "foreach"
    mt.update(students)  # an applied step without a flag


def test_state_round_trip_and_bad_input(gen):
    students = [_net(5)]
    mt = MeanTeacher(students, 0.999)
    _perturb(students, gen)
    mt.update(students, step=1)
    other = MeanTeacher([_net(6)], 0.999)
    other.load_state_dict(mt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.teachers[0].state_dict().values(),
                                                 mt.teachers[0].state_dict().values()))
    assert all(not q.requires_grad for q in other.teachers[0].parameters())
    with pytest.raises(ValueError, match="needs the step"):
        mt.update(students)
    with pytest.raises(ValueError, match=r"alpha cap must be in \[0, 1\)"):
        MeanTeacher(students, 1.0)
