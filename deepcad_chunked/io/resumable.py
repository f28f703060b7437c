"""What every resumable job writing a store shares: its markers, identity and clean-up.

A job (``convert``, ``denoise``) writes its output store with ``complete: false`` and a
fingerprint of its inputs and options, leaves one marker per finished piece of work under
``.progress/<command>/`` inside the store, and sets ``complete`` last. Run again with the
same fingerprint it resumes; with another it refuses to touch the store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from deepcad_chunked.errors import OutputExistsError
from deepcad_chunked.io.omezarr import ATTRS_KEY, is_zarr_store, read_group_attrs

PROGRESS_DIR = ".progress"


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
    return progress_dir(output, command).is_dir()


def remove_partial_writes(array_dir: Path) -> None:
    """Delete temporary files of chunk writes that a kill interrupted (zarr writes a chunk to
    ``KEY.<uuid>.partial`` and renames it)."""
    for stray in array_dir.rglob("*.partial"):
        stray.unlink(missing_ok=True)
