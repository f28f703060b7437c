"""A job's inputs, held to what they were: an output never overlaps an input
(:func:`check_disjoint`), and an input store is pinned (:class:`StorePin`) so that a job
notices when it is rewritten or replaced while it runs. Source files are pinned by their
formats' :class:`~deepcad_chunked.sources.reader.FileState`; every pin has ``verify``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from deepcad_chunked.errors import OutputExistsError, StoreError
from deepcad_chunked.store.attributes import StoreAttributes, ours_in
from deepcad_chunked.store.location import RemotePath, StorePath, resolve
from deepcad_chunked.store.omezarr import ATTRS_KEY, read_group_attrs


def _real(path: StorePath) -> StorePath:
    """A local path with its symbolic links resolved; a URL as it is."""
    return path if isinstance(path, RemotePath) else Path(os.path.realpath(path))


def check_disjoint(output: str | Path | RemotePath,
                   inputs: Iterable[str | Path | RemotePath]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs.

    Symbolic links are resolved on both sides, and an existing output that is the same file
    as an input under another name (a hard link) counts as the input. URLs are compared as
    keys (a local path never overlaps an object).

    Parameters
    ----------
    output : str, Path or RemotePath
        What the command will write (or delete, with ``--overwrite``).
    inputs : iterable of str, Path or RemotePath
        What it reads: files, stores and folders named as sources.

    Raises
    ------
    OutputExistsError
        Naming the output, the input and how they overlap.
    """
    out = _real(resolve(output))
    for item in inputs:
        given = resolve(item)
        src = _real(given)
        if out == src or (isinstance(out, Path) and isinstance(src, Path) and out.exists()
                          and src.exists() and os.path.samefile(out, src)):
            how = "is"
        elif src in out.parents:
            how = "lies inside"
        elif out in src.parents:
            how = "contains"
        else:
            continue
        raise OutputExistsError(f"output {output} {how} the input {given}; choose an output "
                                "outside the command's inputs")


class Pin(Protocol):
    """An input pinned for the length of a job: :meth:`verify` fails if it changed."""

    def verify(self) -> None:
        """Raise a :class:`~deepcad_chunked.errors.DeepCADError` if the input changed."""


def store_identity(path: StorePath) -> dict[str, Any]:
    """What identifies one written state of a store: its job and when it was completed; for
    a store written by another tool, the state of its files
    (:func:`deepcad_chunked.store.foreign.state`)."""
    attrs = read_group_attrs(path)
    if attrs is not None and ATTRS_KEY not in attrs and path.is_dir():
        from deepcad_chunked.store.foreign import state

        return {"foreign": state(path)}
    ours = ours_in(attrs, str(path)) or StoreAttributes()  # the metadata read once
    return {"job": ours.job.fingerprint, "completed": ours.provenance.completed,
            "complete": ours.complete}


@dataclass
class StorePin:
    """A complete input store that must stay the one it was (not rewritten, not replaced)."""

    path: StorePath
    identity: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.identity = store_identity(self.path)

    def verify(self) -> None:
        """Raise StoreError when the store was rewritten, replaced or removed."""
        if store_identity(self.path) != self.identity:
            raise StoreError(f"the input {self.path} was replaced or rewritten while this "
                             "command ran; the output is left incomplete (rerun with "
                             "--overwrite to start again from the new input)")
