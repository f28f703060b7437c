"""Outputs that are not stores: a file written atomically under its writer lock
(:func:`open_file`: exports) and a folder of outputs held by one command (:func:`open_folder`:
a training run, ``run``'s output folder). Both refuse an output that overlaps an input, as
:func:`~deepcad_chunked.store.lifecycle.open_store` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from deepcad_chunked.errors import OutputExistsError, StoreError
from deepcad_chunked.store.lifecycle import (
    LOCK_NAME,
    cannot_write,
    local_output,
    open_file_lock,
    output_path,
    remove_if_empty,
)
from deepcad_chunked.store.location import no_folder
from deepcad_chunked.store.lock import WriterLock
from deepcad_chunked.store.pins import Pin


@contextmanager
def open_file(output: str | Path, *, command: str, inputs: Sequence[str | Path] = (),
              overwrite: bool = False, pins: Sequence[Pin] = ()) -> Iterator[Path]:
    """Write a file atomically under its writer lock.

    Yields a temporary name, unique to this process, in the output's folder; when the block
    ends normally the pins are checked and the file is renamed into place, otherwise it is
    removed. Temporary files of earlier, killed writers are removed first.

    Raises
    ------
    OutputExistsError, LockedError, StoreError
        As :func:`~deepcad_chunked.store.lifecycle.open_store`.
    """
    path = local_output(output_path(output, inputs), "a file output")
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a directory")
    if not path.parent.is_dir():
        raise StoreError(f"cannot write {path}: {no_folder(path.parent)}")
    with open_file_lock(path, command=command) as lock:
        if path.exists() and not overwrite:
            raise OutputExistsError(f"output {path} already exists; pass --overwrite to "
                                    "replace it")
        for stray in path.parent.glob(f".{path.name}.*.partial"):
            stray.unlink(missing_ok=True)  # left by a killed writer: we hold the lock
        partial = path.with_name(f".{path.name}.{lock.holder.token}.partial")
        try:
            yield partial
            lock.check()
            for pin in pins:
                pin.verify()
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


@contextmanager
def open_folder(output: str | Path, *, command: str,
                inputs: Sequence[str | Path] = ()) -> Iterator[WriterLock]:
    """Hold the writer lock of a folder of outputs (created if needed).

    Raises
    ------
    OutputExistsError, LockedError, StoreError
        As :func:`~deepcad_chunked.store.lifecycle.open_store`.
    """
    path = local_output(output_path(output, inputs), "a folder of outputs")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        with WriterLock.acquire(path / LOCK_NAME, output=path, command=command) as lock:
            yield lock
    finally:
        if created:
            remove_if_empty(path)
