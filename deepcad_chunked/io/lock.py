"""A writer lock: one process at a time writes an output.

The lock is a small JSON file — inside an output store (``OUT.zarr/.lock``) or beside an
output file (``.OUT.tif.lock``) — naming its holder: host, process id, the process's start
time, the command and when it took the lock. It appears atomically (written under a temporary
name, then hard-linked to its name, which fails when a lock is there), and while the holder
lives a thread refreshes its modification time (the heartbeat).

A lock whose holder is gone is taken over: on the same host, when no process with that id and
start time exists (it was killed); from another host, when its heartbeat is older than
:data:`STALE_AFTER_S`. Anything else is refused with one line naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from deepcad_chunked.errors import LockedError, StoreError

log = logging.getLogger(__name__)

#: Seconds between two refreshes of a held lock's modification time.
HEARTBEAT_S = 15.0
#: A lock of another host whose heartbeat is older than this is taken to be abandoned.
STALE_AFTER_S = 120.0

#: Errors of the output's filesystem that make a lock (and so any write) impossible.
_CANNOT_WRITE = {errno.EROFS: "its filesystem is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied", errno.ENOSPC: "no space left on its device",
                 errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "its folder does not exist"}


@dataclass(frozen=True)
class Holder:
    """Who holds a lock.

    Attributes
    ----------
    host : str
        Host name of the holding process.
    pid : int
        Its process id.
    process_start : float
        Its start time (seconds since the epoch), to tell it from a later process that got
        the same id.
    since : str
        When it took the lock (UTC, ISO 8601).
    command : str
        What it is doing (``denoise``, ``export``, …).
    token : str
        Unique to this acquisition.
    """

    host: str
    pid: int
    process_start: float
    since: str
    command: str
    token: str

    @classmethod
    def me(cls, command: str) -> Holder:
        """This process, about to take a lock for ``command``."""
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   process_start=psutil.Process().create_time(),
                   since=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   command=command, token=uuid.uuid4().hex)

    def describe(self) -> str:
        """``'denoise' (pid 123 on host node1, since 2026-11-23T20:18:05+00:00)``."""
        return f"'{self.command}' (pid {self.pid} on host {self.host}, since {self.since})"


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # not ours or damaged: treated as a holder that cannot be identified
        return Holder(host="?", pid=-1, process_start=0.0, since="?", command="?", token="?")


def _alive(holder: Holder, lock: Path) -> bool:
    """Whether the holder of a lock may still be running."""
    if holder.host == socket.gethostname() and holder.pid > 0:
        try:
            started = psutil.Process(holder.pid).create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            return False
        return abs(started - holder.process_start) < 1.0
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    return age < STALE_AFTER_S


class WriterLock:
    """A held writer lock (see the module's description); release it with :meth:`release`.

    Parameters
    ----------
    path : Path
        The lock file.
    holder : Holder
        This process's entry in it.
    """

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="writer-lock-heartbeat",
                                      daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, path: Path, *, output: Path, command: str) -> WriterLock:
        """Take the lock at ``path`` for writing ``output``.

        Raises
        ------
        LockedError
            When another live process holds it (the message names it).
        StoreError
            When the lock cannot be written (read-only or full filesystem, no permission).
        """
        me = Holder.me(command)
        tmp = path.with_name(f"{path.name}.{me.token}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(me)))
        except OSError as exc:
            why = _CANNOT_WRITE.get(exc.errno or 0, exc.strerror or str(exc))
            raise StoreError(f"cannot write {output}: {why}") from None
        try:
            for _ in range(5):
                try:
                    os.link(tmp, path)
                    return cls(path, me)
                except FileExistsError:
                    pass
                holder = _read(path)
                if holder is None:
                    continue  # released meanwhile: try again
                if _alive(holder, path):
                    raise LockedError(f"{output} is being written by {holder.describe()}; "
                                      "wait for it to finish or stop it, then rerun")
                log.warning("taking over the lock on %s left by %s, which is no longer "
                            "running", output, holder.describe())
                _remove_stale(path, holder)
            raise LockedError(f"{output}: could not take its lock (other processes keep "
                              "taking it); rerun")
        finally:
            tmp.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
                if _read(self.path) != self.holder:
                    self._lost.set()
            except OSError:
                self._lost.set()

    def check(self) -> None:
        """Raise when this process no longer holds the lock (removed or taken over).

        Raises
        ------
        LockedError
        """
        if self._lost.is_set() or _read(self.path) != self.holder:
            raise LockedError(f"the lock {self.path} was removed or taken over while this "
                              "command held it; its output is left incomplete")

    def release(self) -> None:
        """Give the lock up (only if it is still this process's)."""
        self._stop.set()
        self._beat.join(timeout=5)
        if _read(self.path) == self.holder:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _remove_stale(path: Path, holder: Holder) -> None:
    """Remove a stale lock, unless another process replaced it in the meantime."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process took it over first
    if _read(aside) != holder:  # a fresh lock moved by mistake: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def lock_path(output: Path, *, is_store: bool) -> Path:
    """Where the lock of ``output`` lives: inside a store, beside a file."""
    return output / ".lock" if is_store else output.with_name(f".{output.name}.lock")
