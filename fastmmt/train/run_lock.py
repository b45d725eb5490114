"""One run per output folder at a time: a lock file created with ``O_CREAT | O_EXCL``.

Exclusive creation is atomic on a local file system and on NFS (v3 and later), so two processes,
on one machine or on nodes sharing the folder, can never both create the lock. The file holds
the holder's process id, host, process start time and a random token; a second run is refused at
once with a message naming them. A lock whose holder is gone (same host, the process no longer
exists or is another process with a reused id) is stale, left by a crash or SIGKILL, and is
taken over; a lock held from another host cannot be checked from here, and the message says how
to remove it when that run is known to be over. The lock is released when the holder leaves
its ``with`` block in any way (return, exception, ``KeyboardInterrupt``).

Under torchrun rank 0 holds the lock (:func:`hold_folder`); the other ranks write nothing.
Taking a folder also removes the temporary files an interrupted write left in it
(:func:`fastmmt.train.checkpoint.remove_leftover_temp_files`), which is only safe for its holder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastmmt.train import distributed as ddp
from fastmmt.train.checkpoint import remove_leftover_temp_files

log = logging.getLogger("fastmmt.train")

LOCK_NAME = ".fastmmt.lock"  # in the run folder


class RunLockedError(RuntimeError):
    """Another run holds the output folder."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), which tells a reused process id apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    """Whether the process ``pid`` on this host exists and is the one that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """The lock of one folder, held by this process (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        pid = os.getpid()
        self.record = {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": secrets.token_hex(8)}
        self.held = False

    def _create(self) -> bool:
        """Create the lock file exclusively; False when it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # e.g. a full disk: leave no empty lock behind
            self.path.unlink()
            raise
        return True

    def _read(self) -> tuple[str, dict] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return text, holder if isinstance(holder, dict) else {}

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") != self.record["host"] or not isinstance(holder.get("pid"), int):
            return False
        return not _alive(holder["pid"], holder.get("started"))

    def _take_over(self, text: str) -> None:
        """Remove a stale lock whose content is ``text``. Take-overs are serialised by an ``flock`` on
        a file beside the lock (the kernel releases it if its holder dies); under it the lock is
        removed only while it is still that stale one, so a live lock that a racing process made
        meanwhile is never moved, not even for a moment (renaming it aside and back let a third
        process create a lock in between: two holders)."""
        guard = self.path.with_name(f"{LOCK_NAME}.takeover")
        with open(guard, "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            try:
                found = self._read()
                if found is not None and found[0] == text:
                    self.path.unlink()
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)

    def acquire(self) -> RunLock:
        """Take the folder or raise :class:`RunLockedError` naming the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            if self._create():
                self.held = True
                return self
            found = self._read()
            if found is None:  # released meanwhile
                continue
            text, holder = found
            if not self._is_stale(holder):
                raise RunLockedError(self._refusal(holder))
            log.warning("taking over %s: its holder (process %s on %s) no longer runs", self.path,
                        holder.get("pid"), holder.get("host"))
            self._take_over(text)
        raise RunLockedError(f"cannot take {self.path}: other processes keep creating it")

    def _refusal(self, holder: dict) -> str:
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
               if holder else "an unreadable lock file")
        same_host = holder.get("host") == self.record["host"]
        how = ("wait for it to finish or stop it" if same_host else
               f"wait for it to finish; if that run is known to be over (its host cannot be checked from "
               f"here), remove {self.path}")
        return (f"output folder {self.folder} is in use by another fastmmt run: {who} holds {self.path}; "
                f"{how}, or use another output folder")

    def release(self) -> None:
        """Remove the lock if it is still this process's (a taken-over lock is left alone)."""
        if not self.held:
            return
        self.held = False
        found = self._read()
        if found is not None and found[1].get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


_HELD: dict[Path, list] = {}  # resolved folder -> [RunLock, depth]: a process may take its folder again


def _key(folder: str | os.PathLike) -> Path:
    return Path(folder).resolve()


@contextlib.contextmanager
def hold_folders(folders: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Hold the locks of ``folders`` in this process for the ``with`` block (all or none).

    Re-entrant: a folder this process already holds is counted, not locked twice. On taking a
    folder, the temporary files an interrupted write left in it are removed.
    """
    taken: list[Path] = []
    try:
        for folder in folders:
            key = _key(folder)
            if key in _HELD:
                _HELD[key][1] += 1
            else:
                lock = RunLock(folder).acquire()
                _HELD[key] = [lock, 1]
                remove_leftover_temp_files(folder)
            taken.append(key)
        yield
    finally:
        for key in reversed(taken):
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                entry[0].release()


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, ctx: ddp.DistContext) -> Iterator[None]:
    """:func:`hold_folders` on rank 0 (every rank raises when rank 0 cannot take the folder)."""
    with contextlib.ExitStack() as stack:
        def take() -> None:
            stack.enter_context(hold_folders([folder]))
        ddp.run_on_main(ctx, take)
        yield

