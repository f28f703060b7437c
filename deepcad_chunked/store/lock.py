"""A writer lock: one process at a time writes an output.

The lock is a small JSON file — inside an output store (``OUT.zarr/.lock``) or beside an
output file (``.OUT.tif.lock``) — naming its holder: host, process id, the process's start
time, the command and when it took the lock. It appears atomically (written under a temporary
name, then hard-linked to its name, which fails when a lock is there), and while the holder
lives a thread refreshes its modification time (the heartbeat). In an S3 bucket it is an
object created only if absent and refreshed and removed only while it is the version its
holder wrote (S3's conditional requests); other object stores cannot be written yet.

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

from deepcad_chunked import interrupt
from deepcad_chunked.errors import LockedError, StoreError
from deepcad_chunked.store.location import RemotePath, StorePath

log = logging.getLogger(__name__)

#: Seconds between two refreshes of a held lock's modification time.
HEARTBEAT_S = 15.0
#: A lock of another host whose heartbeat is older than this is taken to be abandoned.
STALE_AFTER_S = 120.0
#: Seconds a stopped command waits for its lock to be removed.
RELEASE_WAIT_S = 3.0

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


def _parse(text: str) -> Holder:
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        # not ours or damaged: treated as a holder that cannot be identified
        return Holder(host="?", pid=-1, process_start=0.0, since="?", command="?", token="?")


def _read(path: Path) -> Holder | None:
    try:
        return _parse(path.read_text())
    except FileNotFoundError:
        return None
    except OSError:
        return _parse("")


class _LocalFile:
    """A lock file on a local (or network-mounted POSIX) filesystem."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, holder: Holder) -> bool:
        """Make the lock appear atomically; False when one is already there."""
        tmp = self.path.with_name(f"{self.path.name}.{holder.token}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(holder)))
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    def read(self) -> Holder | None:
        return _read(self.path)

    def age_s(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def beat(self, holder: Holder) -> bool:
        os.utime(self.path)
        return _read(self.path) == holder

    def remove(self, holder: Holder) -> None:
        if _read(self.path) == holder:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def remove_stale(self, holder: Holder) -> None:
        """Remove a stale lock, unless another process replaced it in the meantime."""
        aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first
        if _read(aside) != holder:  # a fresh lock moved by mistake: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)


class _S3Object:
    """A lock object in an S3 bucket, made safe by S3's conditional requests: it is created
    only if absent (``If-None-Match: *``), and refreshed and removed only while it is the
    version this process saw (``If-Match``)."""

    def __init__(self, path: RemotePath) -> None:
        self.path = path
        self.fs = path.fs
        bucket, key, _ = self.fs.split_path(path.key)
        self.where = {"Bucket": bucket, "Key": key}
        self.etag: str | None = None

    def _head(self) -> dict[str, Any] | None:
        try:
            return self.fs.call_s3("head_object", **self.where)
        except FileNotFoundError:
            return None

    def create(self, holder: Holder) -> bool:
        try:
            reply = self.fs.call_s3("put_object", Body=json.dumps(asdict(holder)).encode(),
                                    IfNoneMatch="*", **self.where)
        except FileExistsError:
            return False
        except OSError as exc:
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                return False
            raise
        self.etag = reply.get("ETag")
        return True

    def read(self) -> Holder | None:
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return None

    def age_s(self) -> float | None:
        head = self._head()
        if head is None:
            return None
        return (dt.datetime.now(dt.timezone.utc) - head["LastModified"]).total_seconds()

    def beat(self, holder: Holder) -> bool:
        try:
            reply = self.fs.call_s3("put_object", Body=json.dumps(asdict(holder)).encode(),
                                    IfMatch=self.etag, **self.where)
        except OSError:
            return False  # removed, or replaced by another process's lock
        self.etag = reply.get("ETag")
        return True

    def _delete_if(self, etag: str | None) -> None:
        if etag is None:
            return
        with contextlib.suppress(OSError):  # gone, or no longer that version: leave it
            self.fs.call_s3("delete_object", IfMatch=etag, **self.where)

    def remove(self, holder: Holder) -> None:
        if self.read() == holder:
            self._delete_if(self.etag)

    def remove_stale(self, holder: Holder) -> None:
        head = self._head()
        if head is not None and self.read() == holder:
            self._delete_if(head.get("ETag"))


def _lock_file(path: StorePath) -> _LocalFile | _S3Object:
    if not isinstance(path, RemotePath):
        return _LocalFile(path)
    if path.protocol in ("s3", "s3a"):
        return _S3Object(path)
    raise StoreError(f"cannot write to {path.protocol}:// yet: its outputs need a lock that "
                     "only S3's conditional writes give (read from it, write to s3:// or a "
                     "local path)")


def _alive(holder: Holder, lock: _LocalFile | _S3Object) -> bool:
    """Whether the holder of a lock may still be running."""
    if holder.host == socket.gethostname() and holder.pid > 0:
        try:
            started = psutil.Process(holder.pid).create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            return False
        return abs(started - holder.process_start) < 1.0
    age = lock.age_s()
    return age is not None and age < STALE_AFTER_S


class WriterLock:
    """A held writer lock (see the module's description); release it with :meth:`release`.

    Parameters
    ----------
    path : Path or RemotePath
        The lock file (or object).
    holder : Holder
        This process's entry in it.
    file : lock-file backend
        How the lock is kept where it lives.
    """

    def __init__(self, path: StorePath, holder: Holder,
                 file: _LocalFile | _S3Object | None = None) -> None:
        self.path = path
        self.holder = holder
        self._file = file or _lock_file(path)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="writer-lock-heartbeat",
                                      daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, path: StorePath, *, output: StorePath, command: str) -> WriterLock:
        """Take the lock at ``path`` for writing ``output``.

        Raises
        ------
        LockedError
            When another live process holds it (the message names it).
        StoreError
            When the lock cannot be written (read-only or full filesystem, no permission).
        """
        me = Holder.me(command)
        file = _lock_file(path)
        for _ in range(5):
            try:
                if file.create(me):
                    return cls(path, me, file)
            except OSError as exc:
                why = _CANNOT_WRITE.get(exc.errno or 0, exc.strerror or str(exc))
                raise StoreError(f"cannot write {output}: {why}") from None
            holder = file.read()
            if holder is None:
                continue  # released meanwhile: try again
            if _alive(holder, file):
                raise LockedError(f"{output} is being written by {holder.describe()}; "
                                  "wait for it to finish or stop it, then rerun")
            log.warning("taking over the lock on %s left by %s, which is no longer "
                        "running", output, holder.describe())
            file.remove_stale(holder)
        raise LockedError(f"{output}: could not take its lock (other processes keep "
                          "taking it); rerun")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._file.beat(self.holder):
                    self._lost.set()
            except OSError:
                self._lost.set()
            except Exception as exc:  # an object store that did not answer: try again later
                log.debug("the heartbeat of %s failed: %s", self.path, exc)

    def check(self) -> None:
        """Raise when this process no longer holds the lock (removed or taken over).

        Raises
        ------
        LockedError
        """
        if self._lost.is_set() or self._file.read() != self.holder:
            raise LockedError(f"the lock {self.path} was removed or taken over while this "
                              "command held it; its output is left incomplete")

    def release(self, *, hurry: bool = False) -> None:
        """Give the lock up (only if it is still this process's).

        When the command is being stopped (Ctrl-C, SIGTERM) or is ending in an error
        (``hurry``), the removal is given :data:`RELEASE_WAIT_S`: an object store that
        stopped answering — often the very reason of the stop — must not hold the command
        up, nor replace its error with its own. A lock left behind names a process that is
        gone, and the next run takes it over.
        """
        self._stop.set()
        hurry = hurry or interrupt.REQUESTED.is_set()
        if not hurry:
            self._beat.join(timeout=5)
            self._file.remove(self.holder)
            return
        remover = threading.Thread(target=self._remove_quietly, name="writer-lock-release",
                                   daemon=True)
        remover.start()
        remover.join(RELEASE_WAIT_S)
        if remover.is_alive():
            log.warning("the lock %s could not be removed in time; the next run takes it "
                        "over (its holder is gone)", self.path)

    def _remove_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._file.remove(self.holder)

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        self.release(hurry=kind is not None)


def lock_path(output: Path, *, is_store: bool) -> Path:
    """Where the lock of ``output`` lives: inside a store, beside a file."""
    return output / ".lock" if is_store else output.with_name(f".{output.name}.lock")
