"""Mean-teacher (EMA) parameter update: ``t <- alpha * t + (1 - alpha) * s``, in place.

Backends: ``ext`` (the compiled extension ``fastmmt._C``: one call for all tensors, C++ with
``at::parallel_for`` on CPU, a multi-tensor kernel on CUDA when built with CUDA), ``foreach``
(``torch._foreach_lerp_``, always available) and ``loop`` (one ``mul_``/``add_`` pair per tensor,
as the original MMT code does; kept for benchmarks). ``auto`` picks ``ext`` when the extension
imports and supports the tensors' device, dtypes and layouts, else ``foreach``. ``ext`` takes any
dense, non-overlapping layout (contiguous, channels_last, ...) that teacher and student share, and
lists mixing float32/float16/bfloat16 (one extension call per dtype).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

EMA_BACKENDS = ("auto", "ext", "foreach", "loop")
_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def load_extension() -> ModuleType | None:
    """The compiled ``fastmmt._C`` module, or None when it was not built."""
    try:
        from fastmmt import _C
    except ImportError:
        return None
    return _C


def ext_supports(device: torch.device) -> bool:
    """True when ``fastmmt._C`` is built and can update tensors on ``device``."""
    ext = load_extension()
    if ext is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and ext.has_cuda())


def _check(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], alpha: float) -> None:
    """Validate everything before any write (the extension re-checks with its own messages)."""
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    if isinstance(alpha, torch.Tensor):  # a device value: its range is the caller's (no host read)
        if alpha.dim() != 0 or not alpha.is_floating_point():
            raise ValueError(f"ema_update_: a tensor alpha must be a 0-dim float tensor, got {tuple(alpha.shape)} "
                             f"{alpha.dtype}")
    elif not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"ema_update_: alpha must be in [0, 1], got {alpha}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
            raise ValueError(
                f"ema_update_: tensor {i} differs: teacher {tuple(t.shape)} {t.dtype} {t.device} vs "
                f"student {tuple(s.shape)} {s.dtype} {s.device}")


def _check_ext(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> None:
    """What the extension checks besides shapes: dtypes it supports, one device, shared dense layouts."""
    devices = {t.device for t in teacher}
    if len(devices) > 1:
        raise ValueError(f"ema_update_: tensors on several devices {sorted(map(str, devices))}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.dtype not in _EXT_DTYPES:
            raise ValueError(f"ema_update_: tensor {i} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if not same_dense_layout(t, s):
            raise ValueError(f"ema_update_: tensor {i} must be dense (no gaps, no overlaps) with the same "
                             f"memory layout in teacher and student (teacher strides {t.stride()}, "
                             f"student strides {s.stride()})")


def same_dense_layout(t: torch.Tensor, s: torch.Tensor) -> bool:
    """True when ``t`` and ``s`` are dense and non-overlapping with one memory layout (the
    extension walks ``numel`` elements from the data pointer); strides of size-1 dims are free."""
    if t.shape != s.shape or not _dense(t):
        return False
    return all(n <= 1 or a == b for n, a, b in zip(t.shape, t.stride(), s.stride()))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, are those of some permutation of the
    shape laid out contiguously (size-1 dims ignored), so the elements fill numel() slots."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _resolve(backend: str, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
             tensor_alpha: bool = False) -> str:
    if backend not in EMA_BACKENDS:
        raise ValueError(f"unknown EMA backend {backend!r}; expected one of {EMA_BACKENDS}")
    if tensor_alpha:
        if backend == "ext":
            raise ValueError("EMA backend 'ext' takes alpha as a number; a tensor alpha (kept on the "
                             "device) needs backend 'auto', 'foreach' or 'loop'")
        return "foreach" if backend == "auto" else backend
    if backend == "ext" and load_extension() is None:
        raise RuntimeError("EMA backend 'ext' requested but fastmmt._C is not built "
                           "(reinstall with `pip install -e . --no-build-isolation`)")
    if backend != "auto":
        return backend
    if load_extension() is None:
        return "foreach"
    devices = {t.device for t in teacher}
    dtypes = {t.dtype for t in teacher}
    one_device_ok = len(devices) <= 1 and all(ext_supports(d) for d in devices)
    layouts_ok = all(same_dense_layout(t, s) for t, s in zip(teacher, student))
    return "ext" if one_device_ok and layouts_ok and dtypes <= set(_EXT_DTYPES) else "foreach"


def _foreach_lerp_device_weight_(teacher: list[torch.Tensor], student: list[torch.Tensor],
                                 weight: torch.Tensor) -> None:
    """``t += weight * (s - t)`` for a 0-dim device ``weight``, read by the kernels, never by the host.

    ``torch._foreach_lerp_(ts, ss, weight)`` binds a 0-dim tensor to its ``Scalar`` overload, which
    reads it on the host (one device sync per call); the ``Tensor`` overload of ``_foreach_mul_``
    takes it as a device pointer. Three multi-tensor launches and one temporary per tensor.
    """
    delta = torch._foreach_sub(student, teacher)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(teacher, delta)


@torch.no_grad()
def ema_update_(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], alpha: float | torch.Tensor,
    backend: str = "auto"
) -> str:
    """Update every teacher tensor in place; returns the name of the backend that ran.

    Nothing is written when the inputs are invalid (lengths, shapes, dtypes, devices, and for
    ``ext`` dense layouts shared by teacher and student and dtypes in float32/float16/bfloat16).
    ``alpha`` may be a 0-dim tensor on the device (``foreach`` or ``loop``): a trainer that decides
    on the device whether a step counts passes ``alpha = 1`` for a refused step without reading
    anything on the host.
    """
    teacher, student = list(teacher), list(student)
    tensor_alpha = isinstance(alpha, torch.Tensor)
    name = _resolve(backend, teacher, student, tensor_alpha)
    _check(teacher, student, alpha)
    if tensor_alpha:
        weight = (1.0 - alpha.to(torch.float64)).to(torch.float32)
        if name == "loop":
            for t, s in zip(teacher, student):
                t.lerp_(s, weight.to(t.dtype))
        elif teacher:
            _foreach_lerp_device_weight_(teacher, student, weight)
        return name
    if name == "ext":
        ext = load_extension()
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(teacher):
            groups.setdefault(t.dtype, []).append(i)
        if len(groups) > 1:  # one extension call per dtype: check every group before any writes
            _check_ext(teacher, student)
        for idx in groups.values():
            ext.ema_update_([teacher[i] for i in idx], [student[i] for i in idx], float(alpha))
    elif name == "loop":
        for t, s in zip(teacher, student):
            t.mul_(alpha).add_(s, alpha=1.0 - alpha)
    elif teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - alpha)
    return name


def _parameter_lists(
    teacher: nn.Module | Sequence[nn.Module], student: nn.Module | Sequence[nn.Module]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pair the parameters of teacher/student modules by name, checking names and shapes."""
    teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    students = [student] if isinstance(student, nn.Module) else list(student)
    if len(teachers) != len(students):
        raise ValueError(f"ema_update_module_: {len(teachers)} teacher modules but {len(students)} students")
    t_all: list[torch.Tensor] = []
    s_all: list[torch.Tensor] = []
    for k, (tm, sm) in enumerate(zip(teachers, students)):
        tp, sp = dict(tm.named_parameters()), dict(sm.named_parameters())
        if tp.keys() != sp.keys():
            only_t, only_s = sorted(tp.keys() - sp.keys()), sorted(sp.keys() - tp.keys())
            raise ValueError(f"ema_update_module_: module pair {k} has different parameters: "
                             f"only in teacher {only_t}, only in student {only_s}")
        for name, t in tp.items():
            s = sp[name]
            if t.shape != s.shape:
                raise ValueError(f"ema_update_module_: module pair {k} parameter {name!r}: teacher "
                                 f"shape {tuple(t.shape)} vs student {tuple(s.shape)} (was the "
                                 "classifier replaced in only one of them?)")
            t_all.append(t)
            s_all.append(s)
    return t_all, s_all


def ema_update_module_(
    teacher: nn.Module | Sequence[nn.Module],
    student: nn.Module | Sequence[nn.Module],
    alpha: float | torch.Tensor,
    backend: str = "auto",
) -> str:
    """Mean-teacher update of PARAMETERS ONLY (buffers such as BN running stats untouched).

    Parameters are paired by name and re-read on every call, so a classifier replaced in both
    networks is picked up; a mismatch raises before anything is written. Pass lists of modules
    (e.g. both teachers and both students) to update them all in one call. Returns the backend.
    """
    t_all, s_all = _parameter_lists(teacher, student)
    return ema_update_(t_all, s_all, alpha, backend)
