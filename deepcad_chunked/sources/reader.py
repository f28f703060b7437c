"""What every source format gives: parts of a recording that read ranges of frames.

A format module (:mod:`~deepcad_chunked.sources.tiff`, :mod:`~deepcad_chunked.sources.hdf5`,
:mod:`~deepcad_chunked.sources.nwb`, :mod:`~deepcad_chunked.sources.suite2p`,
:mod:`~deepcad_chunked.sources.raw`) inspects a file in the driver and returns small, picklable
*parts* (:class:`Part`): where the frames are, their shape, dtype and physical scales, and the
state of the file when it was inspected. A part reads any range of its frames in a worker,
opening the file itself, and refuses a file that changed since it was inspected. A recording is
one or more parts joined in time (:class:`SourcePlan`); the formats are registered in
:mod:`~deepcad_chunked.sources.registry`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcad_chunked.errors import SourceError

if TYPE_CHECKING:
    from deepcad_chunked.config import RawLayout
    from deepcad_chunked.store.recording import Recording

_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str | Path) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``file_2`` before ``file_10``.

    Parameters
    ----------
    path : str or Path
        The path to order; its full text (folders included) is compared.

    Returns
    -------
    tuple
        Alternating text and number parts, comparable between any two paths.
    """
    parts = _DIGITS.split(str(path))
    return tuple((1, int(p)) if p.isdigit() else (0, p.lower()) for p in parts if p)


@dataclass(frozen=True)
class PhysicalMetadata:
    """Physical scales found in a file's metadata; ``None`` where unknown.

    ``origin`` keeps a format's descriptive metadata (an NWB file's session, device and
    imaging plane) so that an export to that format can carry it on.
    """

    frame_interval_s: float | None = None
    pixel_size_um: tuple[float, float] | None = None  # (y, x)
    z_spacing_um: float | None = None
    origin: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Part:
    """One run of frames of a recording, in one file (or one dataset of a file).

    Each format subclasses it with where its frames are and implements :meth:`read`; a part
    is small and picklable, sent to the workers that read it.

    Attributes
    ----------
    path : str
        Absolute path (or URL) of the file.
    size, mtime_ns, ino, ctime_ns : int
        File size, modification time, inode and status-change time when inspected; every
        read checks them, so a file written or replaced while it is read is refused (a
        URL's part has ``ino == -1``: see :func:`check_unchanged`).
    sample : str
        SHA-256 of the file's first and last 64 KiB. With ``path``, ``size``, ``mtime_ns``
        and ``series``, a conversion's identity.
    series : int or str
        What is read in the file: a TIFF image series' index, an HDF5 dataset's path, a raw
        layout.
    kind : str
        The flavour read (``ome``, ``scanimage``, ``hdf5``, ``nwb``, ``suite2p``, ``raw``, …).
    dtype : str
        Native-byte-order sample type.
    frames : int
        Number of time points.
    metadata : PhysicalMetadata
        Scales (and descriptive metadata) found in the file.
    linked : tuple of (str, FileState)
        Other files whose bytes the part reads (the sources of an HDF5 virtual dataset, the
        file an external link points into), each with its state when inspected: pinned and
        checked like ``path``.
    """

    path: str
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    sample: str
    series: int | str
    kind: str
    dtype: str
    frames: int
    metadata: PhysicalMetadata = field(default_factory=PhysicalMetadata)
    linked: tuple[tuple[str, FileState], ...] = ()

    @property
    def files(self) -> list[str]:
        """``path`` and the linked files."""
        return [self.path, *(name for name, _ in self.linked)]

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Shape of one time point (``[c], [z], y, x``)."""
        raise NotImplementedError

    @property
    def axes(self) -> tuple[str, ...]:
        """Output axes, ``t`` first."""
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of this part, shape ``(stop - start, *frame_shape)``,
        native byte order."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PlanePart(Part):
    """A part of single-plane, single-channel frames: axes ``t, y, x``.

    Attributes
    ----------
    height, width : int
        Frame size in pixels.
    """

    height: int
    width: int

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Shape of one frame: ``(y, x)``."""
        return (self.height, self.width)

    @property
    def axes(self) -> tuple[str, ...]:
        """Output axes ``('t', 'y', 'x')``."""
        return ("t", "y", "x")


class HandleCache(threading.local):
    """Open files of one thread, keyed by a part's file and state, least recently used
    closed first: a worker opens each file once, not once per read.

    Parameters
    ----------
    opener : callable
        Opens a part's file read-only; the result must have ``close()``.
    limit : int
        Most files kept open per thread.
    """

    def __init__(self, opener: Callable[[Part], Any], limit: int = 8) -> None:
        self.opener, self.limit = opener, limit
        self.files: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, part: Part) -> Any:
        """The open file of ``part``."""
        key = (part.path, part.size, part.mtime_ns, part.ino, part.ctime_ns)
        handle = self.files.get(key)
        if handle is None:
            handle = self.opener(part)
            self.files[key] = handle
            while len(self.files) > self.limit:
                _, old = self.files.popitem(last=False)
                old.close()
        else:
            self.files.move_to_end(key)
        return handle


@dataclass(frozen=True)
class FileState:
    """A local file's size, times and inode, and a digest of its ends."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    sample: str = ""

    @classmethod
    def of(cls, path: str | Path, *, sample: bool = True) -> FileState:
        """The state of ``path`` now.

        Raises
        ------
        SourceError
            When the file cannot be read.
        """
        try:
            st = os.stat(path)
            digest = sample_digest(path, st.st_size) if sample else ""
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, digest)

    def fields(self) -> dict[str, Any]:
        """Keyword arguments of a part's state fields."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "ino": self.ino,
                "ctime_ns": self.ctime_ns, "sample": self.sample}


def sample_digest(path: str | Path, size: int, span: int = 65536) -> str:
    """SHA-256 of a file's first and last ``span`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(span))
        fh.seek(max(0, size - span))
        h.update(fh.read(span))
    return h.hexdigest()


def check_unchanged(part: Part) -> None:
    """Refuse to go on reading a local file that was written or replaced since it was
    inspected. A part of a remote file (``ino == -1``) is not checked here: its identity
    (size, modification time, digest of its ends) is checked when a conversion resumes.

    Raises
    ------
    SourceError
    """
    if part.ino == -1:
        return
    for path, was in ((part.path, FileState(part.size, part.mtime_ns, part.ino, part.ctime_ns)),
                      *part.linked):
        try:
            st = os.stat(path)
            now = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        except OSError:
            now = None
        if now != (was.size, was.mtime_ns, was.ino, was.ctime_ns):
            through = "" if path == part.path else f" (read through {part.path})"
            raise SourceError(f"{path}{through} changed while it was being read (written, "
                              "replaced or removed); the output is left incomplete")


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency, or say in one line which extra installs it.

    Raises
    ------
    SourceError
        When ``module`` is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceError(f"{what} needs the {module} package: pip install "
                          f"'deepcad-chunked[{extra}]'") from None


# --------------------------------------------------------------------------- recordings

@dataclass(frozen=True)
class SourcePlan:
    """The parts of one recording (files, series or datasets), in order, and where each
    starts on the time axis."""

    sources: tuple[Part, ...]
    starts: tuple[int, ...]

    @property
    def frames(self) -> int:
        """Total number of time points."""
        return self.starts[-1] + self.sources[-1].frames

    @property
    def first(self) -> Part:
        """The first part, whose layout every other part shares."""
        return self.sources[0]

    @property
    def paths(self) -> list[str]:
        """The files, in order, each once."""
        return list(dict.fromkeys(s.path for s in self.sources))

    @property
    def files(self) -> list[str]:
        """Every file read: :attr:`paths` and the files they link to, each once."""
        return list(dict.fromkeys(f for s in self.sources for f in s.files))

    def parts_of(self, start: int, stop: int) -> list[Part]:
        """The parts that hold frames ``start:stop``."""
        return [s for s, s0 in zip(self.sources, self.starts, strict=True)
                if s0 < stop and s0 + s.frames > start]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of the recording, across part boundaries."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        if stop <= self.starts[k] + self.sources[k].frames:  # within one part: no copy
            return self.sources[k].read(start - self.starts[k], stop - self.starts[k])
        out = np.empty((stop - start, *self.first.frame_shape), dtype=self.first.dtype)
        t = start
        while t < stop:
            src, s0 = self.sources[k], self.starts[k]
            n = min(stop, s0 + src.frames) - t
            out[t - start:t - start + n] = src.read(t - s0, t - s0 + n)
            t += n
            k += 1
        return out


def join_parts(parts: Sequence[Part]) -> SourcePlan:
    """Check that parts form one recording and place them on the time axis.

    Raises
    ------
    SourceError
        When a part differs from the first in frame shape, axes or dtype.
    """
    first = parts[0]
    for src in parts[1:]:
        if src.frame_shape != first.frame_shape or src.axes != first.axes:
            raise SourceError(
                f"{Path(src.path).name} has frames of shape {src.frame_shape} (axes "
                f"{''.join(src.axes)}) but {Path(first.path).name} has {first.frame_shape} "
                f"(axes {''.join(first.axes)}); all files of a recording must match")
        if src.dtype != first.dtype:
            raise SourceError(f"{Path(src.path).name} holds {np.dtype(src.dtype)} samples but "
                              f"{Path(first.path).name} holds {np.dtype(first.dtype)}")
    starts = np.concatenate([[0], np.cumsum([s.frames for s in parts])[:-1]])
    return SourcePlan(tuple(parts), tuple(int(s) for s in starts))


# --------------------------------------------------------------------------- formats

#: Inspects one source (a file, ``file:member``, a URL or a folder): its parts, in order.
Inspector = Callable[[str, "RawLayout | None"], tuple[Part, ...]]
#: Writes a recording's slabs to the partial files of an export (named as ``Format.outputs``).
Writer = Callable[["Recording", "Sequence[np.ndarray] | Any", list[Path], str | None], None]


@dataclass(frozen=True)
class Format:
    """One file format: how to recognise, read and write it.

    Attributes
    ----------
    name : str
        What ``export --format`` calls it.
    suffixes : tuple of str
        File name endings it reads and writes (lower case, with the dot).
    inspect : callable
        ``inspect(spec, raw)`` → the parts of the source ``spec``.
    members : bool
        Whether a source may name a member after a colon (``file.h5:/path``).
    folder : callable, optional
        Whether a folder (or a file in it) is a source of this format (a Suite2p plane).
    write : callable, optional
        ``write(recording, slabs, partials, member)`` for ``export``.
    outputs : tuple of str
        File names an export writes inside a folder, renamed into place in this order (the
        last marks it complete); empty for a single-file export.
    """

    name: str
    suffixes: tuple[str, ...]
    inspect: Inspector
    members: bool = False
    folder: Callable[[Path], bool] | None = None
    write: Writer | None = None
    outputs: tuple[str, ...] = ()
