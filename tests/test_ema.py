"""EMA (mean-teacher) update: every backend against a float64 per-tensor reference.

Tolerances: float32 results within 8 fp32 ulps of (|a*t| + |b*s|) of the float64 value;
float16/bfloat16 results of ``ext`` and ``foreach`` are the fp32-arithmetic value rounded ONCE
(within half a ulp of the dtype, plus the fp32 slack); ``ext`` is moreover bit-identical to torch
computing ``a*t + b*s`` in float32 and rounding. ``loop`` rounds twice in 16-bit dtypes (after
``mul_`` and after ``add_``, and torch may round the scalars alpha, 1-alpha to the dtype), so it
gets half a ulp of ``a*t``, one ulp of the result and one dtype epsilon of each term.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmmt.ops import ema_alpha, ema_update_, ema_update_module_
from fastmmt.ops.ema import load_extension

BACKENDS = ["ext", "foreach", "loop"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_SHAPES = [(1,), (3,), (1023,), (65537,), (64, 3, 7, 7), (0,), (300001,)]


def _C():
    ext = load_extension()
    assert ext is not None, "fastmmt._C is not built: run `pip install -e . --no-build-isolation`"
    return ext


def _pairs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    student = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return teacher, student


def _ref64(teacher, student, alpha):
    return [alpha * t.double() + (1.0 - alpha) * s.double() for t, s in zip(teacher, student)]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (float64), subnormal spacing as the floor."""
    fi = torch.finfo(dtype)
    mag = x.abs().clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def _assert_close(out, t0, s0, alpha, dtype, backend):
    ref = alpha * t0.double() + (1.0 - alpha) * s0.double()
    fp32_slack = 8 * torch.finfo(torch.float32).eps * (alpha * t0.double().abs() + (1 - alpha) * s0.double().abs())
    if dtype == torch.float32:
        bound = fp32_slack
    elif backend == "loop":  # mul_ rounds a*t, add_ rounds the sum; the scalars may be rounded too
        scalars = torch.finfo(dtype).eps * (alpha * t0.double().abs() + (1 - alpha) * s0.double().abs())
        bound = 0.5 * _ulp(alpha * t0.double(), dtype) + _ulp(ref, dtype) + scalars + fp32_slack
    else:
        bound = 0.5 * _ulp(ref, dtype) + fp32_slack
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"{backend} {dtype}: max excess {(err - bound).max().item()}"


def test_extension_built_and_auto_picks_it():
    ext = _C()
    t, s = _pairs([(5,)], torch.float32)
    assert ema_update_(t, s, 0.5) == "ext"
    assert ext.num_threads() == torch.get_num_threads()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(backend, dtype):
    alpha = 0.73
    teacher, student = _pairs(ODD_SHAPES, dtype)
    t0 = [t.clone() for t in teacher]
    assert ema_update_(teacher, student, alpha, backend=backend) == backend
    for out, a, b in zip(teacher, t0, student):
        _assert_close(out, a, b, alpha, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ext_is_fp32_arithmetic_rounded_once(dtype):
    alpha = 0.999
    teacher, student = _pairs(ODD_SHAPES, dtype, seed=1)
    a32 = torch.tensor(alpha, dtype=torch.float32)
    b32 = torch.tensor(1.0 - alpha, dtype=torch.float32)
    expect = [(a32 * t.float() + b32 * s.float()).to(dtype) for t, s in zip(teacher, student)]
    _C().ema_update_(teacher, student, alpha)
    for out, e in zip(teacher, expect):
        assert torch.equal(out, e)


def test_many_tensors_split_across_threads():
    """Hundreds of tensors of odd sizes in one call: the flattened parallel split crosses tensor
    boundaries anywhere; every element must be updated exactly once."""
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(0, 5000, (400,), generator=g).tolist() + [1, 65537, 131071]
    teacher, student = _pairs([(n,) for n in sizes], torch.float32, seed=3)
    t0 = [t.clone() for t in teacher]
    _C().ema_update_(teacher, student, 0.25)
    for out, a, b in zip(teacher, t0, student):
        _assert_close(out, a, b, 0.25, torch.float32, "ext")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_edges(backend, dtype):
    teacher, student = _pairs([(1023,), (17, 3)], dtype, seed=4)
    t0 = [t.clone() for t in teacher]
    ema_update_(teacher, student, 1.0, backend=backend)  # alpha 1: teacher unchanged
    assert all(torch.equal(t, a) for t, a in zip(teacher, t0))
    ema_update_(teacher, student, ema_alpha(0), backend=backend)  # alpha(0) = 0: exact copy
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))


@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_first_steps(backend):
    """Steps 0..5 of MMT's schedule (0, 1/2, 2/3, ...) then a 0.999 step, vs float64 iteration."""
    teacher, _ = _pairs([(1023,), (65537,)], torch.float32, seed=5)
    ref = [t.double() for t in teacher]
    for step in list(range(6)) + [5000]:
        alpha = ema_alpha(step)
        student, _ = _pairs([(1023,), (65537,)], torch.float32, seed=100 + step)
        ema_update_(teacher, student, alpha, backend=backend)
        ref = [alpha * r + (1 - alpha) * s.double() for r, s in zip(ref, student)]
    for out, r in zip(teacher, ref):
        assert torch.allclose(out.double(), r, rtol=0, atol=1e-5 * r.abs().max().item())
    assert ema_alpha(0) == 0.0 and ema_alpha(1) == 0.5 and ema_alpha(10**6) == 0.999


def _bad_inputs():
    good_t, good_s = _pairs([(4,), (6,), (5, 2)], torch.float32)
    cases = {
        "length": (good_t, good_s[:2], "3 teacher tensors but 2 student"),
        "shape": (good_t, good_s[:2] + [torch.zeros(2, 5)], "tensor 2: teacher shape"),
        "dtype": (good_t, good_s[:2] + [torch.zeros(5, 2, dtype=torch.float64)], "dtype"),
        "device": (good_t, good_s[:2] + [torch.zeros(5, 2, device="meta")], "meta"),
    }
    return cases


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("case", ["length", "shape", "dtype", "device"])
def test_errors_write_nothing(backend, case):
    teacher, student, _ = _bad_inputs()[case]
    before = [t.clone() for t in teacher]
    with pytest.raises(ValueError):
        ema_update_(teacher, student, 0.5, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before))


@pytest.mark.parametrize("case", ["length", "shape", "dtype", "device"])
def test_extension_validates_before_writing(case):
    """The extension's own checks (it is public: fastmmt._C.ema_update_)."""
    teacher, student, message = _bad_inputs()[case]
    before = [t.clone() for t in teacher]
    with pytest.raises(ValueError, match=message):
        _C().ema_update_(teacher, student, 0.5)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before))


def test_extension_rejects_noncontiguous_unsupported_dtype_and_alpha():
    ext = _C()
    t, s = _pairs([(3,), (4, 6)], torch.float32)
    before = [x.clone() for x in t]
    with pytest.raises(ValueError, match="tensor 1 is not contiguous"):
        ext.ema_update_(t, [s[0], s[1].t().contiguous().t()], 0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        ext.ema_update_(t, s, 1.5)
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        ext.ema_update_([x.double() for x in t], [x.double() for x in s], 0.5)
    assert all(torch.equal(x, b) for x, b in zip(t, before))


def test_auto_falls_back_to_foreach_when_ext_cannot():
    t, s = _pairs([(4, 6)], torch.float64)
    assert ema_update_(t, s, 0.5) == "foreach"
    t, s = _pairs([(4, 6)], torch.float32)
    assert ema_update_([t[0].t()], [s[0].t()], 0.5) == "foreach"
    with pytest.raises(ValueError, match="unknown EMA backend"):
        ema_update_(t, s, 0.5, backend="cuda")


def test_ext_bumps_version_counter():
    t, s = _pairs([(8,)], torch.float32)
    v = t[0]._version
    _C().ema_update_(t, s, 0.5)
    assert t[0]._version > v


class _Net(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, classes, bias=False)


def _trained_pair(seed: int):
    torch.manual_seed(seed)
    teacher, student = _Net(5), _Net(5)
    for net in (teacher, student):  # distinct running stats in each
        net.train()
        net.bn(torch.randn(4, 8, 5, 5) * (1 + seed))
    return teacher, student


@pytest.mark.parametrize("backend", ["auto", "ext", "foreach", "loop"])
def test_module_update_parameters_only(backend):
    teacher, student = _trained_pair(0)
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    params = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    ran = ema_update_module_(teacher, student, 0.6, backend=backend)
    assert ran == ("ext" if backend == "auto" else backend)
    for k, v in teacher.named_buffers():
        assert torch.equal(v, buffers[k]), f"buffer {k} changed"
    sp = dict(student.named_parameters())
    for k, v in teacher.named_parameters():
        _assert_close(v.detach(), params[k], sp[k].detach(), 0.6, torch.float32, backend)


def test_module_update_two_teachers_one_call_and_new_classifier():
    (t1, s1), (t2, s2) = _trained_pair(1), _trained_pair(2)
    for net in (t1, s1, t2, s2):  # classifier replaced in all four (new cluster count)
        net.classifier = nn.Linear(8, 7, bias=False)
    ema_update_module_([t1, t2], [s1, s2], 0.0)
    for t, s in ((t1, s1), (t2, s2)):
        for (k, a), b in zip(t.named_parameters(), s.parameters()):
            assert torch.equal(a, b), k


def test_module_update_mismatch_errors_write_nothing():
    teacher, student = _trained_pair(3)
    student.classifier = nn.Linear(8, 9, bias=False)  # replaced in the student only
    before = [p.detach().clone() for p in teacher.parameters()]
    with pytest.raises(ValueError, match="'classifier.weight': teacher shape \\(5, 8\\) vs student \\(9, 8\\)"):
        ema_update_module_(teacher, student, 0.5)
    student.classifier = nn.Linear(8, 5, bias=True)  # an extra parameter
    with pytest.raises(ValueError, match="only in student \\['classifier.bias'\\]"):
        ema_update_module_(teacher, student, 0.5)
    with pytest.raises(ValueError, match="2 teacher modules but 1 students"):
        ema_update_module_([teacher, teacher], [student], 0.5)
    assert all(torch.equal(p, b) for p, b in zip(teacher.parameters(), before))


@pytest.mark.parametrize("backend", ["auto", "foreach", "loop"])
def test_tensor_alpha_on_the_device(backend):
    """A 0-dim tensor alpha (a trainer's device-side value): the same update as the number, and
    alpha = 1 leaves the teacher bit for bit (a refused step); ``ext`` refuses it by name."""
    teacher, student = _pairs([(3,), (1023,), (64, 3, 7, 7)], torch.float32)
    t0 = [t.clone() for t in teacher]
    name = ema_update_(teacher, student, torch.tensor(0.73, dtype=torch.float64), backend=backend)
    assert name == ("foreach" if backend == "auto" else backend)
    for out, a, b in zip(teacher, t0, student):
        _assert_close(out, a, b, 0.73, torch.float32, "foreach")
    t1 = [t.clone() for t in teacher]
    ema_update_(teacher, student, torch.tensor(1.0), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(teacher, t1))
    with pytest.raises(ValueError, match="'ext' takes alpha as a number"):
        ema_update_(teacher, student, torch.tensor(0.5), backend="ext")
    with pytest.raises(ValueError, match="0-dim float tensor"):
        ema_update_(teacher, student, torch.tensor([0.5]), backend=backend)
