"""The life of an output: checked, locked, created or resumed, pieces marked done, finalised.

Every command that writes a store (``convert``, ``denoise``) goes through :func:`open_store`,
every command that writes a file (``export``) through :func:`open_file`, and every command
that fills a folder (``train``'s run directory, ``run``'s output folder) through
:func:`open_folder`. Each, before anything is written:

- refuses an output that is, contains or lies inside one of the command's inputs (symbolic
  links resolved), so ``--overwrite`` can never delete what the command reads;
- takes the output's writer lock (:mod:`deepcad_chunked.store.lock`), so two commands never
  write one output at once;
- for a store, decides under the lock between a fresh start, a resume and a refusal: the
  store records the job's identity (its inputs and options, ``job.identity``, and their
  fingerprint); rerun with the same identity an unfinished store resumes, with another it is
  refused (naming what differs) unless ``--overwrite``.

While the job runs, each finished piece of work leaves a marker under
``.progress/<command>/`` in the store; :meth:`StoreJob.finalise` checks that the lock is still
held and that the pinned inputs (:class:`~deepcad_chunked.store.pins.StorePin`) did not change, and
writes the completion flag last.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from deepcad_chunked.errors import OutputExistsError, StoreError
from deepcad_chunked.store.attributes import read_ours, read_ours_as_stored
from deepcad_chunked.store.integrity import zarr_target
from deepcad_chunked.store.location import RemotePath, StorePath, no_folder, resolve, rmtree
from deepcad_chunked.store.lock import WriterLock, lock_path
from deepcad_chunked.store.omezarr import (
    ARRAY_PATH,
    is_zarr_store,
    update_attrs,
)
from deepcad_chunked.store.pins import Pin, check_disjoint

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
LOCK_NAME = ".lock"

#: Errors of the output's filesystem, reported as such rather than as a failure of the job.
_WRITE_ERRORS = {errno.ENOSPC: "no space left on its device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "its filesystem is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied"}


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 of a JSON-ready description of a job's inputs and options."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@contextmanager
def writing(output: Path) -> Iterator[None]:
    """Turn a full, read-only or forbidden output location into one clear error.

    Raises
    ------
    StoreError
        Naming ``output``, what went wrong and that the store stays marked incomplete, so a
        rerun after making room resumes it.
    """
    try:
        yield
    except OSError as exc:
        why = _WRITE_ERRORS.get(exc.errno or 0)
        if why is None:
            raise
        raise StoreError(f"cannot write {output}: {why}; it stays marked incomplete — make "
                         "room (or fix the permissions) and rerun the command to resume"
                         ) from None


def cannot_write(path: Path, exc: OSError) -> StoreError:
    why = _WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    return StoreError(f"cannot write {path}: {why}")


def output_path(output: str | Path | RemotePath, inputs: Iterable[str | Path | RemotePath]
            ) -> StorePath:
    """The absolute path (or URL) of an output, refused if it overlaps an input."""
    path = resolve(output)
    check_disjoint(path, inputs)
    return path


def local_output(output: StorePath, what: str) -> Path:
    """Refuse a URL where only a local path works (a TIFF file, a training run's folder)."""
    if isinstance(output, RemotePath):
        raise StoreError(f"{output}: {what} must be a local path (stores may be URLs)")
    return output


# --------------------------------------------------------------------------- stores

@dataclass
class StoreJob:
    """One job writing one store, from :func:`open_store`.

    Attributes
    ----------
    path : Path or RemotePath
        The store.
    command : str
        ``convert``, ``denoise``, …
    identity : dict
        The job's inputs and options (JSON-ready).
    fingerprint : str
        :func:`fingerprint` of ``identity``.
    resuming : bool
        Whether an unfinished run of this very job is being continued.
    lock : WriterLock
        The store's writer lock, held until the job ends.
    pins : list
        Inputs checked again before the store is marked complete.
    """

    path: StorePath
    command: str
    identity: dict[str, Any]
    fingerprint: str
    resuming: bool
    lock: WriterLock
    pins: list[Pin]

    @property
    def progress(self) -> StorePath:
        """The folder of this job's per-piece markers (and pinned copies of inputs)."""
        return self.path / PROGRESS_DIR / self.command

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's ``deepcad_chunked`` attributes as they are now."""
        return read_ours_as_stored(self.path)

    def job_attrs(self) -> dict[str, Any]:
        """The ``job`` entry a new store records: command, identity and fingerprint."""
        return {"command": self.command, "fingerprint": self.fingerprint,
                "identity": self.identity}

    def create(self, make: Callable[[], None]) -> None:
        """Write a new store with ``make()`` (whose attributes must carry
        :meth:`job_attrs` and ``complete: False``), then its progress folder."""
        with writing(self.path):
            make()
            self.progress.mkdir(parents=True)

    def check(self) -> None:
        """Raise if the lock was lost or a pinned input changed."""
        self.lock.check()
        for pin in self.pins:
            pin.verify()

    def finalise(self, **attrs: Any) -> None:
        """Check the lock and the pinned inputs, write ``attrs``, the completion time, the
        array's shape (which readers compare with its metadata) and the completion flag
        (last), and remove the progress markers."""
        self.check()
        provenance = {**(self.attrs.get("provenance") or {}), "completed": now()}
        shape = list(zarr.open_array(zarr_target(self.path / ARRAY_PATH, read_only=True),
                                     mode="r").shape)
        with writing(self.path):
            update_attrs(self.path, **attrs, provenance=provenance, shape=shape,
                         complete=True)
        rmtree(self.path / PROGRESS_DIR)

    def remove_partial_writes(self) -> None:
        """Delete temporary files of chunk writes that a kill interrupted (zarr writes a chunk
        to ``KEY.<uuid>.partial`` and renames it; an object store has none)."""
        if isinstance(self.path, RemotePath):
            return
        for stray in self.path.rglob("*.partial"):
            stray.unlink(missing_ok=True)


#: A store's root metadata: removed last, so a store cut off while being cleared is still
#: recognisably a Zarr store (and cleared by the next run) rather than a folder to refuse.
_ROOT_METADATA = ("zarr.json", ".zgroup", ".zattrs", ".zarray")


def _clear(path: StorePath) -> None:
    """Delete everything in a store's folder but its lock, the root metadata last."""
    entries = sorted((e for e in path.iterdir() if e.name != LOCK_NAME),
                     key=lambda e: e.name in _ROOT_METADATA)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            rmtree(entry)
        else:
            entry.unlink()


def _only_lock_or_empty(path: StorePath) -> bool:
    return all(e.name == LOCK_NAME or e.name.startswith(f"{LOCK_NAME}.") for e in path.iterdir())


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Words for what differs between two job identities."""
    words = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, list) and isinstance(b, list) and all(
                isinstance(e, dict) and "path" in e for e in (*a, *b)):
            before = {e["path"]: e for e in a}
            changed = [e for e in b if before.get(e["path"]) not in (None, e)]
            if changed and len(a) == len(b):
                what = describe_change(before[changed[0]["path"]], changed[0])
                words.append(f"{key} ({what})")
                continue
        words.append(key)
    return ", ".join(words) or "inputs or options"


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Words for how an input file changed, from its identity then and now (``path``,
    ``size``, ``mtime_ns``, ``sample``, and ``linked``: the same for the files it reads
    through links): ``rec.tif changed since (4096 → 8192 bytes)``."""
    before = {e["path"]: e for e in old.get("linked") or []}
    for entry in new.get("linked") or []:
        if before.get(entry["path"]) != entry:
            then = before.get(entry["path"])
            return (f"{Path(entry['path']).name} (read through {Path(new['path']).name}) "
                    f"{_how(then, entry)}")
    if len(before) != len(new.get("linked") or []):
        return f"the files {Path(new['path']).name} links to changed since"
    return f"{Path(new['path']).name} {_how(old, new)}"


def _how(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "is new since"
    if old.get("size") != new.get("size"):
        return f"changed since ({old.get('size')} → {new.get('size')} bytes)"
    return "changed since (rewritten: same size, other modification time or bytes)"


def _make_room(path: StorePath) -> bool:
    """Check that ``path`` can become a store; create its folder. True if it was created."""
    if isinstance(path, RemotePath):
        if path.is_file():
            raise OutputExistsError(f"output {path} exists and is not a Zarr store; refusing "
                                    "to touch it, even with --overwrite")
        if path.exists() and not (is_zarr_store(path) or _only_lock_or_empty(path)):
            raise OutputExistsError(f"output {path} exists and is not a Zarr store; refusing "
                                    "to delete it, even with --overwrite")
        return False  # an object store has no folders to create
    if path.is_symlink():
        raise OutputExistsError(f"output {path} is a symbolic link; give the path it points to")
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError(f"output {path} exists and is not a Zarr store; refusing "
                                    "to touch it, even with --overwrite")
        if not (is_zarr_store(path) or _only_lock_or_empty(path)):
            raise OutputExistsError(f"output {path} exists and is not a Zarr store; refusing "
                                    "to delete it, even with --overwrite")
        return False
    if not path.parent.is_dir():
        raise StoreError(f"cannot write {path}: {no_folder(path.parent)}")
    try:
        path.mkdir()
    except FileExistsError:
        return False
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return True


def _resumable(path: StorePath, command: str, identity: dict[str, Any], job_fingerprint: str,
               overwrite: bool) -> bool:
    """Under the lock: True to resume; False after making the folder ready for a new store."""
    if not is_zarr_store(path):
        _clear(path)  # an empty folder, or a job that died before writing any metadata
        return False
    if overwrite:
        _clear(path)
        return False
    ours = read_ours(path)
    if ours is None:
        raise OutputExistsError(f"output {path} already exists (a Zarr store written by "
                                "something else); pass --overwrite to replace it")
    if ours.complete:
        raise OutputExistsError(f"output {path} already exists; pass --overwrite to replace it")
    job = ours.job
    if job.command != command or job.fingerprint != job_fingerprint:
        what = (_differences(job.identity, identity)
                if job.command == command and job.identity else None)
        raise OutputExistsError(
            f"output {path} holds an unfinished '{job.command or '?'}' run with other "
            f"{what or 'inputs or options'}; rerun that command to resume it, or pass "
            "--overwrite to replace it")
    if (path / PROGRESS_DIR / command).is_dir():
        return True
    _clear(path)  # this very job died while creating its store: start afresh
    return False


@contextmanager
def open_store(output: str | Path | RemotePath, *, command: str, identity: dict[str, Any],
               inputs: Sequence[str | Path | RemotePath] = (), overwrite: bool = False,
               pins: Sequence[Pin] = ()) -> Iterator[StoreJob]:
    """Open a store for a job to write: checked, locked, and new or resumed.

    Parameters
    ----------
    output : str, Path or RemotePath
        The store: a local path or an fsspec URL (``s3://bucket/rec.zarr``).
    command : str
        The job's name (its markers live under ``.progress/<command>``).
    identity : dict
        The job's inputs and options, JSON-ready: an unfinished store with the same identity
        is resumed, one with another is refused unless ``overwrite``.
    inputs : sequence of paths
        What the job reads; the output may not be, contain or lie inside any of them.
    overwrite : bool
        Replace an existing store (never anything that is not a Zarr store).
    pins : sequence of Pin
        Inputs that must not change before the store is finalised.

    Yields
    ------
    StoreJob
        ``resuming`` says whether to continue (markers in ``progress``) or to
        :meth:`~StoreJob.create` the store. The lock is released when the block ends.

    Raises
    ------
    OutputExistsError
        An output overlapping an input, a finished store or an unfinished one of another
        job (without ``overwrite``), or something that is not a Zarr store.
    LockedError
        Another process is writing the store.
    StoreError
        The store's folder cannot be written.
    """
    path = output_path(output, inputs)
    created = _make_room(path)
    try:
        lock = WriterLock.acquire(path / LOCK_NAME, output=path, command=command)
    except BaseException:
        if created:
            remove_if_empty(path)
        raise
    try:
        job_fingerprint = fingerprint(identity)
        resuming = _resumable(path, command, identity, job_fingerprint, overwrite)
        job = StoreJob(path=path, command=command, identity=identity,
                       fingerprint=job_fingerprint, resuming=resuming, lock=lock,
                       pins=list(pins))
        if resuming:
            log.info("resuming the unfinished %s in %s", command, path)
            job.remove_partial_writes()
        yield job
    except BaseException:
        lock.release(hurry=True)
        remove_if_empty(path)
        raise
    lock.release()
    remove_if_empty(path)


def remove_if_empty(path: StorePath) -> None:
    """Remove a store folder this job created and never wrote into."""
    if isinstance(path, RemotePath):
        return
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    except OSError:
        pass


def remove_store(path: str | Path, *, command: str) -> None:
    """Delete a store (or folder) under its lock, so no running job loses it unawares.

    Raises
    ------
    LockedError
        When another process is writing it.
    """
    path = resolve(path)
    if not path.exists():
        return
    if isinstance(path, RemotePath) and not path.is_dir():
        raise StoreError(f"{path} is not a store; refusing to delete it")
    if not path.is_dir() or path.is_symlink():
        with open_file_lock(path, command=command):
            path.unlink()
        return
    with WriterLock.acquire(path / LOCK_NAME, output=path, command=command):
        _clear(path)
    rmtree(path)


@contextmanager
def open_file_lock(output: Path, *, command: str) -> Iterator[WriterLock]:
    """Hold the writer lock of a file output (it lives beside the file)."""
    with WriterLock.acquire(lock_path(output, is_store=False), output=output,
                            command=command) as lock:
        yield lock
