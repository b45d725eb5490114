"""Checkpoints written atomically, read back with a fallback past a corrupt or truncated file.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over the target (``os.replace`` is atomic on POSIX), so a crash or a full disk never leaves a
half-written ``last.pt``. The previous checkpoint is kept as ``prev.pt``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with torch.save to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return path


def _unlink_quiet(path: str) -> None:
    """Remove a temporary file if it exists (cleanup after a failed write)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_checkpoint(state: dict, folder: str | os.PathLike) -> Path:
    """Write ``folder/last.pt`` atomically, keeping the former one as ``folder/prev.pt``."""
    folder = Path(folder)
    last = folder / "last.pt"
    if last.exists():
        os.replace(last, folder / "prev.pt")  # atomic; last.pt is rewritten right after
    return atomic_save(state, last)


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict | None:
    """Load the newest readable checkpoint of ``folder`` (last.pt, else prev.pt); None if there is none.

    A corrupt or truncated file is reported (logged with its path) and skipped.
    """
    folder = Path(folder)
    errors = []
    for name in ("last.pt", "prev.pt"):
        p = folder / name
        if not p.exists():
            continue
        try:
            return torch.load(p, map_location=map_location, weights_only=False)
        except Exception as e:  # a truncated zip, a pickle error: report and fall back
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", p, e)
            errors.append(f"{p}: {e}")
    if errors:
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
    return None
