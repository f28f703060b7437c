"""HDF5 recordings (CaImAn, DeepInterpolation, Fiji's HDF5 files): ``file.h5`` or
``file.h5:/path/to/dataset``, read lazily with h5py.

A source names one 3D dataset ``(t, y, x)``; without a path the file must hold exactly one.
Compressed datasets are read through their filters (gzip, and Blosc, LZ4, Zstd through
hdf5plugin). A part holds only the file's name and the dataset's path; each worker thread
opens the file itself, once. Local files and ``http(s)://`` URLs (read by range requests,
see :mod:`deepcad_chunked.sources.remote`) are read alike, so
:mod:`deepcad_chunked.sources.nwb` reads an NWB file's series through this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources.reader import (
    FileState,
    Format,
    HandleCache,
    PhysicalMetadata,
    PlanePart,
    check_unchanged,
    require,
)
from deepcad_chunked.sources.remote import is_http, open_url, url_state

if TYPE_CHECKING:
    from deepcad_chunked.config import RawLayout
    from deepcad_chunked.store.recording import Recording

log = logging.getLogger(__name__)

#: File name endings read as HDF5.
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
#: Dataset an export writes when the output names none.
DEFAULT_DATASET = "/data"
#: Attributes read as the frame rate (Hz) and the pixel size (µm), on the dataset or the file.
_RATE_ATTRS = ("frame_rate_hz", "frame_rate", "fr", "fs", "rate")
_SIZE_ATTRS = ("pixel_size_um", "element_size_um")


def h5py() -> Any:
    """The h5py module, with hdf5plugin's filters registered when it is installed.

    Raises
    ------
    SourceError
        Naming the extra to install when h5py is missing.
    """
    module = require("h5py", "hdf5", "reading and writing HDF5")
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401  (registers Blosc, LZ4, Zstd, … with HDF5)
    return module


@dataclass(frozen=True, kw_only=True)
class Hdf5Source(PlanePart):
    """One 3D dataset of an HDF5 file (or an NWB series' data), ``series`` its path in the
    file, ``kind`` ``hdf5`` or ``nwb``; ``path`` may be an ``http(s)://`` URL.

    Attributes
    ----------
    transposed : bool
        The dataset is stored ``(t, x, y)`` (NWB's order) and is read transposed.
    """

    transposed: bool = False

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop``, native byte order."""
        check_unchanged(self)
        dataset = _handles.get(self)[self.series]
        try:
            data = dataset[start:stop]
        except OSError as exc:
            raise SourceError(_read_error(self, exc, f"{start}–{stop - 1}")) from None
        if self.transposed:
            data = data.transpose(0, 2, 1)
        check_unchanged(self)
        return np.ascontiguousarray(data, dtype=self.dtype)


def _read_error(part: Hdf5Source, exc: BaseException, frames: str = "") -> str:
    """One line for a failed read: a missing filter plugin, or damaged data (a filter that
    ran and failed: a Fletcher32 checksum that does not match, a chunk that does not
    decompress)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lower = text.lower()
    where = f"{part.path}:{part.series}" + (f" (frames {frames})" if frames else "")
    if any(w in lower for w in ("not registered", "not available", "plugin",
                                "can't open directory")):
        return (f"{part.path}:{part.series} is compressed with an HDF5 filter that is not "
                f"available ({text}); pip install 'deepcad-chunked[hdf5]' adds hdf5plugin")
    if "filter returned failure" in lower:
        return (f"{where} is damaged: a chunk fails its checksum or does not decompress "
                f"({text}); the file cannot be trusted — copy it again from its origin")
    return f"{where} cannot be read (truncated or damaged: {text})"


def open_file(path: str, *, size: int | None = None) -> Any:
    """An h5py File opened read-only on a local path or an ``http(s)://`` URL (``size``: the
    URL's, when known, saves a request).

    Raises
    ------
    SourceError
        When the file is missing, not HDF5, truncated or damaged.
    """
    module = h5py()
    try:
        if is_http(path):
            return module.File(open_url(path, size=size), "r")
        return module.File(path, "r", locking=False)
    except SourceError:
        raise
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not is_http(path) and not Path(path).exists():
            raise SourceError(f"source {path} does not exist") from None
        raise SourceError(f"{path} is not a readable HDF5 file ({reason})") from None


_handles = HandleCache(lambda part: open_file(part.path, size=part.size))


def split_member(spec: str, suffixes: Iterable[str]) -> tuple[str, str | None]:
    """``file.h5:/a/b`` → (``file.h5``, ``/a/b``); a spec without a member → (spec, None)."""
    lower = spec.lower()
    for suffix in suffixes:
        at = lower.rfind(suffix + ":")
        if at > 0 and spec[at + len(suffix) + 1:]:
            return spec[:at + len(suffix)], spec[at + len(suffix) + 1:]
    return spec, None


@contextlib.contextmanager
def open_spec(spec: str, suffixes: Iterable[str]
              ) -> Iterator[tuple[str, str | None, FileState, Any]]:
    """Open the file a source names (``file.h5:/member``, a local path or a URL): its
    absolute path or URL, the member named (or None), its state, and the open h5py File.

    Raises
    ------
    SourceError
        When the file is missing, not HDF5, truncated or damaged.
    """
    path, member = split_member(spec, suffixes)
    if not is_http(path):
        path = str(Path(path).expanduser().resolve())
    state = url_state(path) if is_http(path) else FileState.of(path)
    with open_file(path, size=state.size) as handle:
        yield path, member, state, handle


def datasets_3d(handle: Any) -> list[str]:
    """Paths of the file's datasets of three dimensions, in file order, those reached through
    soft or external links included (groups are entered through hard links only)."""
    module = h5py()
    found: list[str] = []

    def walk(group: Any, prefix: str) -> None:
        for key in group:
            link = group.get(key, getlink=True)
            try:
                obj = group.get(key)
            except (KeyError, OSError):
                obj = None  # a link to nothing
            if isinstance(obj, module.Group):
                if isinstance(link, module.HardLink):
                    walk(obj, f"{prefix}{key}/")
            elif getattr(obj, "ndim", None) == 3 and obj.dtype.kind in "uif":
                found.append(f"/{prefix}{key}")

    walk(handle, "")
    return found


def describe(path: str, state: FileState, handle: Any, dataset: str, *, kind: str = "hdf5",
             transposed: bool = False, metadata: PhysicalMetadata | None = None) -> Hdf5Source:
    """Describe one dataset of an open file, checking that it can be read.

    Raises
    ------
    SourceError
        When the dataset is missing, not 3D numeric, or cannot be read (a missing filter).
    """
    where = f"{path}:{dataset}"
    obj = handle.get(dataset)
    if obj is None:
        raise SourceError(f"{path} has no dataset {dataset}")
    if not hasattr(obj, "shape"):
        raise SourceError(f"{where} is a group, not a dataset")
    if obj.ndim != 3 or obj.dtype.kind not in "uif":
        raise SourceError(f"{where} holds {obj.ndim}-D {obj.dtype} data; a recording is a "
                          "3-D (t, y, x) dataset of numbers")
    frames, a, b = (int(n) for n in obj.shape)
    height, width = (b, a) if transposed else (a, b)
    if min(frames, height, width) < 1:
        raise SourceError(f"{where} is empty (shape {tuple(obj.shape)})")
    linked = tuple((name, FileState.of(name)) for name in linked_files(path, obj))
    part = Hdf5Source(path=path, **state.fields(), series="/" + dataset.lstrip("/"), kind=kind,
                      dtype=np.dtype(obj.dtype).newbyteorder("=").str, frames=frames,
                      height=height, width=width, transposed=transposed,
                      metadata=metadata or _metadata(handle, obj), linked=linked)
    try:  # a missing filter or a truncated file shows at the first read, not at opening
        obj[0, :1, :1]
        obj[frames - 1, -1:, -1:]
    except (OSError, ValueError, RuntimeError) as exc:
        raise SourceError(_read_error(part, exc)) from None
    return part


def linked_files(path: str, obj: Any) -> list[str]:
    """The other files whose bytes a dataset's reads take: the file an external link led
    into, the sources of a virtual dataset, the files of external raw storage. HDF5 reads
    a missing one as fill values without a word, so each must be there.

    Raises
    ------
    SourceError
        When one is missing, lacks the dataset the mapping names, or is named by a pattern,
        or a virtual dataset is read over HTTP.
    """
    where = f"{path}:{obj.name}"
    own = str(obj.file.filename)
    found: list[str] = []
    if not is_http(path) and os.path.realpath(own) != os.path.realpath(path):
        found.append(os.path.abspath(own))  # an external link led into another file
    base = os.path.dirname(os.path.abspath(own))
    if obj.is_virtual:
        if is_http(path):
            raise SourceError(f"{where} is a virtual dataset, whose source files cannot be "
                              "read over HTTP; download the files and convert them locally")
        for mapping in obj.virtual_sources():
            name = mapping.file_name
            if name == ".":
                continue
            if "%" in name:
                raise SourceError(f"{where} is a virtual dataset whose sources are named by a "
                                  f"pattern ({name}); name its files directly")
            full = os.path.normpath(os.path.join(base, name))
            if not os.path.isfile(full):
                raise SourceError(f"{where} is a virtual dataset reading from {full}, which "
                                  "does not exist (HDF5 would give its frames as zeros)")
            with open_file(full) as source:
                if mapping.dset_name not in source:
                    raise SourceError(f"{where} is a virtual dataset reading "
                                      f"{full}:{mapping.dset_name}, which is not there (HDF5 "
                                      "would give its frames as zeros)")
            found.append(full)
    for name, _, _ in obj.external or ():
        full = os.path.normpath(os.path.join(base, os.fsdecode(name)))
        if not os.path.isfile(full):
            raise SourceError(f"{where} stores its samples in {full}, which does not exist")
        found.append(full)
    return list(dict.fromkeys(found))


def _number(value: Any) -> float | None:
    try:
        number = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _metadata(handle: Any, dataset: Any) -> PhysicalMetadata:
    rate = size = None
    for where in (dataset.attrs, handle.attrs):
        rate = rate or next((_number(where[k]) for k in _RATE_ATTRS if k in where), None)
        if size is None:
            for key in _SIZE_ATTRS:
                values = np.asarray(where.get(key, []), dtype=np.float64).reshape(-1)
                if values.size >= 2 and np.all(values[-2:] > 0):
                    size = (float(values[-2]), float(values[-1]))
                    break
    return PhysicalMetadata(frame_interval_s=1.0 / rate if rate else None, pixel_size_um=size)


def inspect_hdf5(spec: str, raw: RawLayout | None = None) -> tuple[Hdf5Source, ...]:
    """The dataset a source names (``file.h5:/path``), or the file's only 3D dataset.

    Raises
    ------
    SourceError
        When the file cannot be read, the dataset is missing or not 3D, or the file holds
        no or several 3D datasets and the source names none.
    """
    with open_spec(spec, HDF5_SUFFIXES) as (path, member, state, handle):
        if member is None:
            found = datasets_3d(handle)
            if not found:
                raise SourceError(f"{path} holds no 3-D dataset (t, y, x)")
            if len(found) > 1:
                listed = ", ".join(found[:5]) + (", …" if len(found) > 5 else "")
                raise SourceError(f"{path} holds {len(found)} 3-D datasets ({listed}); name "
                                  f"one: {Path(path).name}:{found[0]}")
            member = found[0]
        return (describe(path, state, handle, member),)


def write_hdf5(rec: Recording, slabs: Iterable[np.ndarray], partials: list[Path],
               member: str | None) -> None:
    """Write a ``(t, y, x)`` recording as one chunked dataset (``/data`` unless the output
    names one), with ``frame_rate_hz``, ``pixel_size_um`` and ``element_size_um``
    attributes that :func:`inspect_hdf5` (and Fiji) read back."""
    module = h5py()
    if rec.axes != ("t", "y", "x"):
        raise SourceError(f"{rec.path} has axes {','.join(rec.axes)}; HDF5 export writes "
                          "t,y,x recordings")
    t, y, x = rec.shape
    with writing_file(module, partials[0]) as handle:
        data = handle.create_dataset(member or DEFAULT_DATASET, shape=rec.shape,
                                     dtype=rec.dtype, chunks=(min(t, rec.chunks[0]), y, x))
        start = 0
        for slab in slabs:
            data[start:start + slab.shape[0]] = slab
            start += slab.shape[0]
        if rec.stored.frame_rate_hz:
            data.attrs["frame_rate_hz"] = float(rec.stored.frame_rate_hz)
        size = rec.stored.pixel_size_um
        if size:
            data.attrs["pixel_size_um"] = np.asarray(size, dtype=np.float64)
            data.attrs["element_size_um"] = np.asarray([1.0, *size], dtype=np.float64)
        data.attrs["axes"] = "tyx"


@contextlib.contextmanager
def writing_file(module: Any, path: Path) -> Iterator[Any]:
    """An HDF5 file opened for writing whose failure never crashes the process.

    When writing fails (a full disk, above all), HDF5 must still close the file, which flushes
    its metadata: with no room that close fails too, and the objects left half-closed crash
    the interpreter when they are freed. So on any failure the file's bytes are dropped first
    (the output is a temporary that is removed anyway), which gives the close its room; the
    file is flushed inside the guard, so a flush that finds the disk full is handled alike.
    """
    handle = module.File(path, "w")
    try:
        yield handle
        handle.flush()
    except BaseException:
        drop_bytes(path)
        with contextlib.suppress(Exception):
            handle.close()
        raise
    handle.close()


def drop_bytes(path: Path) -> None:
    """Truncate a temporary output to nothing (freeing its space), if it is still there."""
    with contextlib.suppress(OSError):
        os.truncate(path, 0)


FORMAT = Format("hdf5", HDF5_SUFFIXES, inspect_hdf5, members=True, write=write_hdf5)
