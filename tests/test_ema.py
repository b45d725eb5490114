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

from fastmmt.ops import ema_update_, ema_update_module_
from fastmmt.train.mean_teacher import ema_alpha
from fastmmt.ops.ema import load_extension

BACKENDS = ["ext", "foreach", "loop"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_SHAPES = [(1,), (3,), (1023,), (65537,), (64, 3, 7, 7), (0,), (300001,)]


def _C():
    ext = load_extension()
    assert ext is not None, "fastmmt._C is not built: run `pip install -e . --no-build-isolation`"
    return ext


def _pairs(shapes, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    student = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
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


@pytest.mark.gpu
def test_cuda_extension_built_and_auto_picks_it(device):
    """On a CUDA machine the extension must have been built with its CUDA kernel."""
    assert _C().has_cuda(), "fastmmt._C was built without CUDA (see the build log's skip line)"
    t, s = _pairs([(5,), (64, 3, 7, 7)], torch.float32, device=device)
    assert ema_update_(t, s, 0.5) == "ext"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(backend, dtype, device):
    alpha = 0.73
    teacher, student = _pairs(ODD_SHAPES, dtype, device=device)
    t0 = [t.clone() for t in teacher]
    assert ema_update_(teacher, student, alpha, backend=backend) == backend
    for out, a, b in zip(teacher, t0, student):
        _assert_close(out.cpu(), a.cpu(), b.cpu(), alpha, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ext_is_fp32_arithmetic_rounded_once(dtype, device):
    alpha = 0.999
    teacher, student = _pairs(ODD_SHAPES, dtype, seed=1, device=device)
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
def test_alpha_edges(backend, dtype, device):
    teacher, student = _pairs([(1023,), (17, 3)], dtype, seed=4, device=device)
    t0 = [t.clone() for t in teacher]
    ema_update_(teacher, student, 1.0, backend=backend)  # alpha 1: teacher unchanged
    assert all(torch.equal(t, a) for t, a in zip(teacher, t0))
    ema_update_(teacher, student, ema_alpha(0, 0.999), backend=backend)  # alpha(0) = 0: exact copy
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))


@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_first_steps(backend):
    """Steps 0..5 of MMT's schedule (0, 1/2, 2/3, ...) then a 0.999 step, vs float64 iteration."""
    teacher, _ = _pairs([(1023,), (65537,)], torch.float32, seed=5)
    ref = [t.double() for t in teacher]
    for step in list(range(6)) + [5000]:
        alpha = ema_alpha(step, 0.999)
        student, _ = _pairs([(1023,), (65537,)], torch.float32, seed=100 + step)
        ema_update_(teacher, student, alpha, backend=backend)
        ref = [alpha * r + (1 - alpha) * s.double() for r, s in zip(ref, student)]
    for out, r in zip(teacher, ref):
        assert torch.allclose(out.double(), r, rtol=0, atol=1e-5 * r.abs().max().item())
    assert ema_alpha(0, 0.999) == 0.0 and ema_alpha(1, 0.999) == 0.5 and ema_alpha(10**6, 0.999) == 0.999


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


def test_extension_rejects_mismatched_or_gapped_layouts_unsupported_dtype_and_alpha():
    ext = _C()
    t, s = _pairs([(3,), (4, 6)], torch.float32)
    before = [x.clone() for x in t]
    with pytest.raises(ValueError, match=r"tensor 1 must be dense .* same memory layout .*strides \[6, 1\].*\[1, 4\]"):
        ext.ema_update_(t, [s[0], s[1].t().contiguous().t()], 0.5)  # layouts differ
    with pytest.raises(ValueError, match="tensor 1 must be dense"):
        ext.ema_update_([t[0], t[1][:, ::2]], [s[0], s[1][:, ::2]], 0.5)  # gaps
    with pytest.raises(ValueError, match="alpha must be in"):
        ext.ema_update_(t, s, 1.5)
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        ext.ema_update_([x.double() for x in t], [x.double() for x in s], 0.5)
    assert all(torch.equal(x, b) for x, b in zip(t, before))


def test_auto_falls_back_to_foreach_when_ext_cannot():
    t, s = _pairs([(4, 6)], torch.float64)
    assert ema_update_(t, s, 0.5) == "foreach"
    t, s = _pairs([(4, 6)], torch.float32)
    assert ema_update_([t[0][:, ::2]], [s[0][:, ::2]], 0.5) == "foreach"  # gaps
    assert ema_update_([t[0].t()], [s[0].t().contiguous()], 0.5) == "foreach"  # layouts differ
    with pytest.raises(ValueError, match="unknown EMA backend"):
        ema_update_(t, s, 0.5, backend="cuda")


@pytest.mark.parametrize("backend", ["auto", "ext"])
def test_channels_last_and_transposed_layouts_take_the_extension(backend, device):
    """Channels-last conv weights (not is_contiguous()) and transposed matrices are dense: the
    extension updates them in place when teacher and student share the layout."""
    teacher, student = _pairs([(64, 3, 7, 7), (256, 64, 1, 1), (8, 5), (1, 3, 1, 1)], torch.float32,
                              seed=6, device=device)
    teacher[:2] = [t.contiguous(memory_format=torch.channels_last) for t in teacher[:2]]
    student[:2] = [s.contiguous(memory_format=torch.channels_last) for s in student[:2]]
    teacher[2], student[2] = teacher[2].t(), student[2].t()
    assert not teacher[0].is_contiguous() and not teacher[2].is_contiguous()
    t0 = [t.clone() for t in teacher]
    ptrs = [t.data_ptr() for t in teacher]
    assert ema_update_(teacher, student, 0.3, backend=backend) == "ext"
    assert [t.data_ptr() for t in teacher] == ptrs and teacher[0].is_contiguous(memory_format=torch.channels_last)
    for out, a, b in zip(teacher, t0, student):
        _assert_close(out.cpu(), a.cpu(), b.cpu(), 0.3, torch.float32, "ext")


def test_mixed_dtype_lists_are_grouped(device):
    """float32 and bfloat16 parameters in one list (e.g. a partly cast model): one call per dtype."""
    t32, s32 = _pairs([(1023,), (17, 3)], torch.float32, seed=7, device=device)
    t16, s16 = _pairs([(65,), (4, 4)], torch.bfloat16, seed=8, device=device)
    teacher, student = [t32[0], t16[0], t32[1], t16[1]], [s32[0], s16[0], s32[1], s16[1]]
    t0 = [t.clone() for t in teacher]
    assert ema_update_(teacher, student, 0.6) == "ext"
    for out, a, b in zip(teacher, t0, student):
        _assert_close(out.cpu(), a.cpu(), b.cpu(), 0.6, out.dtype, "ext")


def test_mixed_dtype_list_with_a_bad_group_writes_nothing():
    t32, s32 = _pairs([(10,)], torch.float32)
    t16, s16 = _pairs([(4, 6)], torch.bfloat16)
    teacher, student = [t32[0], t16[0][:, ::2]], [s32[0], s16[0][:, ::2]]
    before = [t.clone() for t in teacher]
    with pytest.raises(ValueError, match="tensor 1 must be dense"):
        ema_update_(teacher, student, 0.5, backend="ext")
    assert all(torch.equal(t, b) for t, b in zip(teacher, before))


@pytest.mark.gpu
def test_pending_cuda_error_is_not_reported_as_the_emas():
    """A CUDA error left by earlier work (here a failed cudaMalloc) is named as such, before
    anything is written; the next update runs normally."""
    import ctypes

    teacher, student = _pairs([(1000,)], torch.float32, device="cuda")
    before = teacher[0].clone()
    ptr = ctypes.c_void_p()
    libs = [line.split()[-1] for line in open("/proc/self/maps") if "libcudart" in line]
    assert libs, "libcudart not loaded by torch"
    rt = ctypes.CDLL(libs[0])
    assert rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(1 << 62)) != 0  # leaves a pending error
    with pytest.raises(RuntimeError, match="CUDA error from earlier work was pending"):
        ema_update_(teacher, student, 0.5, backend="ext")
    assert torch.equal(teacher[0], before)
    assert ema_update_(teacher, student, 0.5, backend="ext") == "ext"


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


@pytest.mark.parametrize("backend", ["auto", "foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_alpha_is_never_read_on_the_host(backend, dtype):
    """A 0-dim tensor alpha must reach only Tensor overloads: on meta tensors a Scalar overload
    (``torch._foreach_lerp_(ts, ss, weight)`` with a 0-dim weight) calls ``.item()`` and raises,
    which on CUDA is a device sync per step that patching ``Tensor.item`` cannot see."""
    teacher = [torch.empty(s, device="meta", dtype=dtype) for s in [(3,), (64, 3, 7, 7)]]
    student = [torch.empty_like(t) for t in teacher]
    alpha = torch.tensor(0.73, device="meta")
    assert ema_update_(teacher, student, alpha, backend=backend) == ("foreach" if backend == "auto" else backend)
    assert all(t.shape == s.shape and t.dtype == dtype for t, s in zip(teacher, student))
