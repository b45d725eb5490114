"""Checkpoints written atomically, read back with a fallback past a corrupt or truncated file.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over the target (``os.replace`` is atomic on POSIX), so a crash or a full disk never leaves a
half-written ``last.pt``. The previous checkpoint is kept as ``prev.pt``. Temporary files are
named ``.NAME.XXXX.tmp`` (:func:`temp_file_beside`); one left by a killed write is removed by
:func:`remove_leftover_temp_files` when the next run takes the folder. Checkpoints are read with
:func:`fastmmt.safe_load.safe_load`: a file in the checkpoint folder never runs code.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastmmt.safe_load import UnreadableFileError, UnsafeFileError, safe_load
from fastmmt.train.distributed import DistContext, check_same_on_all_ranks

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected."""


TEMP_SUFFIX = ".tmp"


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temporary file (fd, name) in ``path``'s folder, named ``.NAME.XXXX.tmp``: hidden, and
    recognised by :func:`remove_leftover_temp_files`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)


def remove_leftover_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed write left in ``folder`` and ``folder/ckpt``.

    Only for the run that holds the folder (:mod:`fastmmt.train.run_lock`): another run's write
    in progress would otherwise lose its file. Returns what was removed (logged).
    """
    folder = Path(folder)
    removed = []
    for sub in (folder, folder / "ckpt"):
        if not sub.is_dir():
            continue
        for p in sorted(sub.glob(f".*{TEMP_SUFFIX}")):
            if p.is_file():
                _unlink_quiet(str(p))
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write: %s", len(removed),
                 ", ".join(str(p) for p in removed))
    return removed


def _write_temp(obj: Any, path: Path) -> str:
    """torch.save ``obj`` to a flushed, fsynced temporary file beside ``path``; returns its name.

    A failed write (e.g. a full disk) removes the temporary file and raises an ``OSError`` that
    names ``path``; nothing that existed before is touched.
    """
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _unlink_quiet(tmp)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; files written before are "
                               f"left as they were") from e
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with torch.save to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    os.replace(_write_temp(obj, path), path)
    return path


def _unlink_quiet(path: str) -> None:
    """Remove a temporary file if it exists (cleanup after a failed write)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_checkpoint(state: dict, folder: str | os.PathLike) -> Path:
    """Write ``folder/last.pt`` atomically, keeping the former one as ``folder/prev.pt``.

    The new state is fully written (temporary file, fsync) before any rename, so a failed write
    leaves ``last.pt`` and ``prev.pt`` as they were; between the two renames a crash leaves
    ``prev.pt`` only, which :func:`load_checkpoint` falls back to.
    """
    folder = Path(folder)
    last = folder / "last.pt"
    tmp = _write_temp(state, last)
    if last.exists():
        os.replace(last, folder / "prev.pt")
    os.replace(tmp, last)
    return last


def newest_checkpoint(folder: str | os.PathLike,
                      map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest readable checkpoint of ``folder`` (last.pt, else prev.pt) and its path; None if
    there is none.

    A truncated or corrupt file is reported (logged with its path) and skipped. A file that
    holds something a safe load refuses (:class:`~fastmmt.safe_load.UnsafeFileError`) or that is
    not a checkpoint (no integer ``epoch``) stops here with a :class:`CheckpointError` naming it:
    it was put there, not left by a crash, so the previous checkpoint is not silently used.
    """
    folder = Path(folder)
    errors = []
    for name in ("last.pt", "prev.pt"):
        p = folder / name
        if not p.exists():
            continue
        try:
            state = safe_load(p, map_location=map_location)
        except UnsafeFileError as e:
            raise CheckpointError(f"{e}; or move it out of {folder}") from None
        except (UnreadableFileError, OSError) as e:  # a truncated zip, a pickle error: report and fall back
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", p, e)
            errors.append(str(e) if str(p) in str(e) else f"{p}: {e}")
            continue
        if not (isinstance(state, dict) and isinstance(state.get("epoch"), int)):
            what = f"a dict with keys {sorted(map(str, state))[:6]}" if isinstance(state, dict) else \
                f"a {type(state).__name__}"
            raise CheckpointError(f"{p} is not a fastmmt checkpoint (it holds {what}, no 'epoch'); move it "
                                  f"out of {folder}, or start a new run in another output folder")
        return state, p
    if errors:
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
    return None


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict | None:
    """The state of :func:`newest_checkpoint` (None if there is none)."""
    found = newest_checkpoint(folder, map_location)
    return None if found is None else found[0]


def read_resume_checkpoint(folder: str | os.PathLike, map_location: str | torch.device,
                           ctx: DistContext) -> tuple[dict, Path] | None:
    """:func:`newest_checkpoint` on every rank (``folder`` must be visible to all of them), checked
    to give the same epoch everywhere; a rank that cannot read it stops all ranks."""
    try:
        found_ck = newest_checkpoint(folder, map_location)
        found: Any = None if found_ck is None else found_ck[0]["epoch"]
    except CheckpointError as e:
        found_ck, found = None, str(e)
    check_same_on_all_ranks(found, f"checkpoint found in {folder} (its epoch)", ctx)
    if isinstance(found, str):
        raise CheckpointError(f"cannot resume: {found}")
    return found_ck
