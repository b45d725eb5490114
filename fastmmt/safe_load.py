"""Reading torch files that may come from outside without running code stored in them.

Model files, checkpoints, official MMT release files and ImageNet weights are all pickles, and an
ordinary pickle load runs whatever the file tells it to. :func:`safe_load` is ``torch.load`` with
``weights_only=True`` and an explicit allow-list (:data:`ALLOWED_GLOBALS`): tensors, containers
and plain values (what torch allows anyway) plus numpy arrays, scalars and dtypes (the official
release files hold a ``numpy.float64`` mAP; fastmmt's checkpoints hold numpy label arrays).
A file that holds anything else is refused with :class:`UnsafeFileError`, naming the file, what it
holds and how to convert it once if its source is trusted (:func:`convert_trusted_file`, behind
``fastmmt convert --trust-file``). This module imports nothing else of fastmmt.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import torch


class UnsafeFileError(ValueError):
    """A file holds an object outside the allow-list: loading it could run code stored in it."""


class UnreadableFileError(ValueError):
    """A file is not a torch file at all, or a truncated / corrupt one."""


def _numpy_globals() -> list:
    """numpy's pickling entry points under both module names: ``numpy.core`` (numpy 1, e.g. the
    official 2020 release files) and ``numpy._core`` (numpy 2)."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
    dtype_types = sorted({type(np.dtype(c)) for c in np.typecodes["All"]}, key=lambda t: t.__name__)
    out: list = [np.ndarray, np.dtype, *dtype_types]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(core, name)
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    return out


ALLOWED_GLOBALS = _numpy_globals()  # beyond torch's own weights-only set: numpy values only

CONVERT_HINT = ("if you trust where the file came from, convert it once with `fastmmt convert --trust-file "
                "{path} OUT.pt` (that one load runs any code stored in the file) and use OUT.pt")


def _refused_globals(path: str) -> list[str]:
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip file (the legacy format): the unpickler's message is all there is
        return []


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path)`` that never runs code from the file (weights only, :data:`ALLOWED_GLOBALS`).

    Raises :class:`UnsafeFileError` for a file holding anything else (the message names the file,
    what it holds and :data:`CONVERT_HINT`), :class:`UnreadableFileError` for a file that is not
    a readable torch file, ``FileNotFoundError`` for a missing one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = _refused_globals(path) or re.findall(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" not in text or not found:
            reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
            raise UnreadableFileError(f"{path} is not a readable torch file (truncated, corrupt or another format: "
                                      f"{reason.group(1).strip() if reason else _first_line(text)})") from None
        raise UnsafeFileError(f"{path} holds {', '.join(sorted(set(found)))}, which fastmmt does not load: "
                              f"loading it could run code stored in the file; "
                              + CONVERT_HINT.format(path=path)) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UnreadableFileError(f"{path} is not a readable torch file (truncated, corrupt or another "
                                  f"format: {type(e).__name__}: {_first_line(str(e))})") from None


def _first_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[0] if lines else "no message"


def to_plain(obj: Any, where: str = "", dropped: list[str] | None = None) -> Any:
    """``obj`` reduced to what :func:`safe_load` accepts: tensors, numpy values, containers and
    plain values; a module becomes its state dict, an object with attributes (e.g. an
    ``argparse.Namespace``) a dict of them; anything else is left out and named in ``dropped``."""
    dropped = [] if dropped is None else dropped
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor, np.ndarray,
                                       np.generic, np.dtype, torch.dtype, torch.device, torch.Size)):
        if isinstance(obj, np.ndarray) and obj.dtype == object:
            return to_plain(obj.tolist(), where, dropped)
        return obj
    if isinstance(obj, torch.nn.Module):
        return to_plain(obj.state_dict(), where, dropped)
    if isinstance(obj, dict):
        out: dict = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                dropped.append(f"{where}[{k!r}] (key of type {type(k).__name__})")
                continue
            out[k] = to_plain(v, f"{where}[{k!r}]", dropped)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [to_plain(v, f"{where}[{i}]", dropped) for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if hasattr(obj, "__dict__") and not callable(obj):
        return to_plain(dict(vars(obj)), where, dropped)
    dropped.append(f"{where or 'the file'} ({type(obj).__module__}.{type(obj).__qualname__})")
    return None


def convert_trusted_file(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Load ``src`` with a full pickle load (THIS RUNS ANY CODE STORED IN ``src``: only for files
    from a trusted source), reduce it with :func:`to_plain` and save it to ``dst``, which
    :func:`safe_load` then reads. Returns what was left out."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} does not exist")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"convert: write the converted file elsewhere than {src} (the original is kept)")
    obj = torch.load(src, map_location="cpu", weights_only=False)
    dropped: list[str] = []
    plain = to_plain(obj, "", dropped)
    tmp = f"{dst}.partial"
    try:
        torch.save(plain, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    safe_load(dst)  # the point of the conversion: it must load safely now
    return dropped
