"""What every resumable job writing a store shares: its markers, identity and clean-up.

A job (``convert``, ``denoise``) writes its output store with ``complete: false`` and a
fingerprint of its inputs and options, leaves one marker per finished piece of work under
``.progress/<command>/`` inside the store, and sets ``complete`` last. Run again with the
same fingerprint it resumes; with another it refuses to touch the store.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepcad_chunked.errors import OutputExistsError, StoreError
from deepcad_chunked.io.omezarr import ATTRS_KEY, is_zarr_store, read_group_attrs

PROGRESS_DIR = ".progress"


#: Errors of the output's filesystem, reported as such rather than as a failure of the job.
_WRITE_ERRORS = {errno.ENOSPC: "no space left on its device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "its filesystem is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied"}


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


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 of a JSON-ready description of a job's inputs and options."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def progress_dir(output: Path, command: str) -> Path:
    """Where a job's per-piece markers live inside its output store."""
    return output / PROGRESS_DIR / command


def can_resume(output: Path, command: str, job_fingerprint: str, overwrite: bool) -> bool:
    """True when ``output`` is an unfinished run of exactly this job.

    A store of this job that was cut off before its first piece of work (no progress folder
    yet) is removed, and False returned: the job starts again from scratch.

    Raises
    ------
    OutputExistsError
        When ``output`` is an unfinished run of another job (other inputs or options) and
        ``overwrite`` is false.
    """
    if overwrite or not is_zarr_store(output):
        return False
    ours = (read_group_attrs(output) or {}).get(ATTRS_KEY)
    if not isinstance(ours, dict) or ours.get("complete"):
        return False
    if ours.get("job", {}).get("fingerprint") != job_fingerprint:
        raise OutputExistsError(
            f"output {output} holds an unfinished '{command}' run with other inputs or options; "
            "rerun that command to resume it, or pass --overwrite to replace it")
    if progress_dir(output, command).is_dir():
        return True
    # this very job died while creating its store, before any work was done: start afresh
    shutil.rmtree(output)
    return False


def remove_partial_writes(array_dir: Path) -> None:
    """Delete temporary files of chunk writes that a kill interrupted (zarr writes a chunk to
    ``KEY.<uuid>.partial`` and renames it)."""
    for stray in array_dir.rglob("*.partial"):
        stray.unlink(missing_ok=True)
