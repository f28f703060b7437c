"""Inspecting TIFF files and reading ranges of frames from them, with tifffile.

A recording's frames are addressed by output axes ``t`` (and ``c``, ``z`` where the source
has them). :func:`inspect_tiff` maps those axes onto the pages of the file's image series once,
in the driver; :func:`read_frames` then reads any range of frames in a worker, opening the file
itself (one handle per thread, cached) so that nothing but the small :class:`TiffSource` is ever
sent over the network.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources.reader import (
    FileState,
    Format,
    HandleCache,
    Part,
    SourcePlan,
    check_unchanged,
    join_parts,
)
from deepcad_chunked.sources.tiff_metadata import physical_metadata, scanimage_layout
from deepcad_chunked.store.recording import require_numbers

if TYPE_CHECKING:
    from deepcad_chunked.store.recording import Recording

log = logging.getLogger(__name__)

#: File name endings read as TIFF.
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")

#: Output axes that may sit between ``t`` and ``y, x``, in NGFF order.
EXTRA_AXES = ("c", "z")

@dataclass(frozen=True, kw_only=True)
class TiffSource(Part):
    """How the frames of one TIFF file map onto its pages (``series``: the index of the
    tifffile image series read; a file of several series that continue one another is read
    as several parts, in order; ``kind``: tifffile's name for its flavour).

    Attributes
    ----------
    extra : dict
        Sizes of the extra output axes present (``c``, ``z``), in NGFF order.
    height, width : int
        Frame size in pixels.
    strides : dict
        Page-index stride of each output axis (``t``, ``c``, ``z``).
    contiguous_offset : int or None
        File offset of the series' uncompressed, contiguous data, if it is stored so.
    file_byteorder : str
        ``<`` or ``>``: byte order of the samples in the file.
    """

    extra: dict[str, int]
    height: int
    width: int
    strides: dict[str, int]
    contiguous_offset: int | None
    file_byteorder: str

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Shape of one time point: ``([c], [z], y, x)``."""
        return (*self.extra.values(), self.height, self.width)

    @property
    def axes(self) -> tuple[str, ...]:
        """Output axes, e.g. ``('t', 'y', 'x')`` or ``('t', 'c', 'z', 'y', 'x')``."""
        return ("t", *self.extra, "y", "x")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of this part (:func:`read_frames`)."""
        return read_frames(self, start, stop)


def _open_tiff(path: Path) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path)
    except tifffile.TiffFileError as exc:
        raise SourceError(f"{path} is not a readable TIFF file ({exc})") from None
    except (OSError, ValueError, EOFError, IndexError, KeyError, struct_error()) as exc:
        raise SourceError(f"{path} could not be opened as TIFF: {exc}") from None


def struct_error() -> type[Exception]:
    import struct

    return struct.error


class _WarningCatcher(logging.Handler):
    """Collects tifffile's warnings while a file is inspected: they flag damaged files."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def inspect_tiff(path: str | Path) -> tuple[TiffSource, ...]:
    """Map the frames of a TIFF file onto its pages and check that all of them are present.

    A file normally holds one image series. Several series of the same frames (pages appended
    to a file by successive writes) are read one after the other, every frame in order; any
    other mix of series (pages of different sizes, OME images of several positions) is
    refused rather than read in part.

    Parameters
    ----------
    path : str or Path
        A TIFF, BigTIFF, OME-TIFF, ImageJ hyperstack or ScanImage file.

    Returns
    -------
    tuple of TiffSource
        One small, picklable description per series, in file order, from which
        :func:`read_frames` reads.

    Raises
    ------
    SourceError
        When the file is missing, not a TIFF, truncated, holds RGB samples, has axes that
        cannot be read as a time series, or holds series that do not continue one another.
    """
    path = Path(path).resolve()
    state = FileState.of(path)
    catcher = _WarningCatcher()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(catcher)
    try:
        with _open_tiff(path) as tif:
            if not tif.series:
                raise SourceError(f"{path} holds no images")
            parts = tuple(_describe(tif, path, state, i) for i in range(len(tif.series)))
            if len(parts) > 1:
                _check_continuous(tif, parts, path)
            for part in parts:
                _check_complete(tif, part, state.size)
    except SourceError:
        raise
    except Exception as exc:  # tifffile raises many types on damaged files
        raise SourceError(f"{path} is damaged or not a supported TIFF: {exc}") from None
    finally:
        tlog.removeHandler(catcher)
    damage = [m for m in catcher.messages if "offset" in m or "truncat" in m or "corrupt" in m]
    if damage:
        raise SourceError(f"{path} is truncated or damaged: {damage[0]}")
    return parts


#: Series kinds that are plain runs of pages; several of them in one file continue each other.
_APPENDABLE = ("shaped", "uniform", "generic")


def _check_continuous(tif: tifffile.TiffFile, parts: tuple[TiffSource, ...], path: Path) -> None:
    """Refuse several series unless they are runs of the same frames, one after the other."""
    first = parts[0]
    pages = [[p.index for p in tif.series[s.series].pages if p is not None] for s in parts]
    joinable = (all(s.kind in _APPENDABLE for s in parts)
                and all(s.frame_shape == first.frame_shape and s.axes == first.axes
                        and s.dtype == first.dtype for s in parts)
                and all(a and b and max(a) < min(b) for a, b in itertools.pairwise(pages)))
    if not joinable:
        described = "; ".join(
            f"series {s.series + 1}: {s.frames} × {'×'.join(map(str, s.frame_shape))} "
            f"{np.dtype(s.dtype)} ({s.kind})" for s in parts[:4])
        more = f"; and {len(parts) - 4} more" if len(parts) > 4 else ""
        raise SourceError(f"{path} holds {len(parts)} image series that are not one "
                          f"recording ({described}{more}); split it into one file per "
                          "recording and convert those")
    log.info("%s holds %d series of the same frames (appended pages); reading all %d frames "
             "in order", path.name, len(parts), sum(s.frames for s in parts))


def _describe(tif: tifffile.TiffFile, path: Path, state: FileState, index: int) -> TiffSource:
    series = tif.series[index]
    axes = series.axes.upper()
    shape = tuple(int(s) for s in series.shape)
    if len(axes) < 2 or axes[-2:] != "YX":
        if "S" in axes[-3:]:
            raise SourceError(f"{path} holds RGB/multi-sample pixels ({axes}); "
                              "only single-sample (grayscale) frames are supported")
        raise SourceError(f"{path} has axes {axes!r}; expected frames of Y×X pixels")
    page_axes, page_shape = axes[:-2], shape[:-2]
    height, width = shape[-2:]
    if "S" in page_axes and page_shape[page_axes.index("S")] > 1:
        raise SourceError(f"{path} holds RGB/multi-sample pixels ({axes}); "
                          "only single-sample (grayscale) frames are supported")
    if tif.is_scanimage and series.kind == "scanimage":
        npages = math.prod(page_shape)
        sizes, strides, meta = scanimage_layout(tif, npages, path)
    else:
        sizes, strides = _generic_layout(page_axes, page_shape, path)
        meta = physical_metadata(tif, series)
    frames = sizes.pop("t")
    if frames < 1:
        raise SourceError(f"{path} holds no frames")
    extra = {ax: sizes[ax] for ax in EXTRA_AXES if sizes.get(ax, 1) > 1}
    strides = {ax: strides[ax] for ax in ("t", *extra)}
    dtype = np.dtype(series.dtype)
    require_numbers(dtype, str(path))
    contiguous = series.dataoffset
    if contiguous is not None and int(series.nbytes) != math.prod(shape) * dtype.itemsize:
        contiguous = None
    return TiffSource(
        path=str(path), **state.fields(), series=index,
        kind=str(series.kind), dtype=dtype.newbyteorder("=").str, frames=frames, extra=extra,
        height=int(height), width=int(width), strides=strides,
        contiguous_offset=None if contiguous is None else int(contiguous),
        file_byteorder=">" if tif.byteorder == ">" else "<", metadata=meta,
    )


def describe_growing(path: str | Path) -> TiffSource | None:
    """The layout and metadata of a TIFF file whose writer may not be done with it, read from
    what it holds now (the first page's metadata, as :func:`inspect_tiff` reads it), or None
    while it cannot be parsed yet. Its ``frames`` count only the pages there are now.

    Raises
    ------
    SourceError
        When the file is readable but cannot be a time series of grayscale frames.
    """
    path = Path(path).resolve()
    try:
        state = FileState.of(path, sample=False)
        tif = tifffile.TiffFile(path)
    except Exception:  # not enough of it written yet
        return None
    with tif:
        try:
            if not tif.series:
                return None
            return _describe(tif, path, state, 0)
        except SourceError:
            raise
        except Exception:
            return None


def _generic_layout(page_axes: str, page_shape: tuple[int, ...],
                    path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Output axis sizes and page strides for a series whose page axes tifffile named."""
    names: list[str] = []
    for ax, n in zip(page_axes, page_shape, strict=True):
        if ax == "T":
            names.append("t")
        elif ax == "C":
            names.append("c")
        elif ax == "Z":
            names.append("z")
        elif n == 1:
            names.append("_")  # a singleton axis of any other kind carries no data
        else:
            names.append("?")
    unknown = [i for i, nm in enumerate(names) if nm == "?"]
    if "t" not in names:
        # No explicit time axis: a lone stack axis (ImageJ "slices", a plain page sequence)
        # is the time axis of a time-lapse recording.
        candidates = unknown or [i for i, nm in enumerate(names) if nm == "z"]
        if len(candidates) == 1:
            names[candidates[0]] = "t"
            unknown = [i for i in unknown if i != candidates[0]]
        elif not candidates:
            names.insert(0, "t")
            page_shape = (1, *page_shape)
    if unknown or len(set(n for n in names if n != "_")) != len([n for n in names if n != "_"]):
        raise SourceError(f"{path}: cannot tell which of its axes {page_axes!r} {page_shape} "
                          "is time")
    sizes: dict[str, int] = {}
    strides: dict[str, int] = {}
    stride = 1
    for nm, n in zip(reversed(names), reversed(page_shape), strict=True):
        if nm != "_":
            sizes[nm], strides[nm] = int(n), stride
        stride *= int(n)
    for ax in EXTRA_AXES:
        sizes.setdefault(ax, 1)
        strides.setdefault(ax, 0)
    return sizes, strides


def _check_complete(tif: tifffile.TiffFile, source: TiffSource, file_size: int) -> None:
    """Refuse files whose image data runs past their end (truncated downloads/copies)."""
    path = source.path
    itemsize = np.dtype(source.dtype).itemsize
    if source.contiguous_offset is not None:
        pages = source.frames * source.strides["t"]
        end = source.contiguous_offset + pages * source.height * source.width * itemsize
        if end > file_size:
            raise SourceError(f"{path} is truncated: its image data needs {end} bytes, "
                              f"the file has {file_size}")
        return
    needed = source.frames * source.strides["t"]
    pages = tif.series[source.series].pages
    if len(pages) < needed:
        raise SourceError(f"{path} is truncated: {len(pages)} of {needed} pages present")
    for i in range(needed):
        page = pages[i]
        if page is None:
            raise SourceError(f"{path} is missing page {i}")
        offsets, counts = page.dataoffsets, page.databytecounts
        if not offsets or not any(counts):
            raise SourceError(f"{path} is truncated or damaged: page {i} has no image data")
        end = max(o + c for o, c in zip(offsets, counts, strict=True))
        if end > file_size:
            raise SourceError(f"{path} is truncated: page {i} ends at byte {end}, "
                              f"the file has {file_size}")


# --------------------------------------------------------------------------- reading

_handles = HandleCache(lambda part: _open_tiff(Path(part.path)))


def page_indices(source: TiffSource, start: int, stop: int) -> np.ndarray:
    """Page numbers of frames ``start:stop`` in output order ``(t, [c], [z])``.

    Parameters
    ----------
    source : TiffSource
        The file's layout.
    start, stop : int
        Frame range, ``0 <= start < stop <= source.frames``.

    Returns
    -------
    numpy.ndarray
        Integer page indices, shape ``(stop - start, *extra sizes)``.
    """
    grids = [np.arange(start, stop) * source.strides["t"]]
    grids += [np.arange(n) * source.strides[ax] for ax, n in source.extra.items()]
    index = grids[0].reshape(-1, *([1] * len(source.extra)))
    for k, g in enumerate(grids[1:], start=1):
        shape = [1] * (len(grids))
        shape[k] = -1
        index = index + g.reshape(shape)
    return index


def read_frames(source: TiffSource, start: int, stop: int) -> np.ndarray:
    """Read frames ``start:stop`` of a TIFF file.

    Parameters
    ----------
    source : TiffSource
        Layout from :func:`inspect_tiff`.
    start, stop : int
        Frame range within this file.

    Returns
    -------
    numpy.ndarray
        Shape ``(stop - start, [c], [z], y, x)``, native byte order, dtype ``source.dtype``.
    """
    check_unchanged(source)
    index = page_indices(source, start, stop)
    flat = index.ravel()
    tif = _handles.get(source)
    consecutive = bool(np.all(np.diff(flat) == 1)) if flat.size > 1 else True
    if source.contiguous_offset is not None:
        data = _read_contiguous(tif, source, flat, consecutive)
    else:
        key = range(int(flat[0]), int(flat[-1]) + 1) if consecutive else [int(i) for i in flat]
        data = tif.asarray(key=key, series=source.series, maxworkers=1)
    data = np.asarray(data).reshape(*index.shape, source.height, source.width)
    check_unchanged(source)  # not written while these frames were being read
    return data.astype(source.dtype, copy=False)


def _read_contiguous(tif: tifffile.TiffFile, source: TiffSource, flat: np.ndarray,
                     consecutive: bool) -> np.ndarray:
    page_bytes = source.height * source.width * np.dtype(source.dtype).itemsize
    file_dtype = np.dtype(source.dtype).newbyteorder(source.file_byteorder)
    out = np.empty((flat.size, source.height, source.width), dtype=file_dtype)
    fh = tif.filehandle
    with fh.lock:
        if consecutive:
            fh.seek(source.contiguous_offset + int(flat[0]) * page_bytes)
            _readinto(fh, out, source.path)
        else:
            for k, page in enumerate(flat):
                fh.seek(source.contiguous_offset + int(page) * page_bytes)
                _readinto(fh, out[k], source.path)
    return out


def _readinto(fh: tifffile.FileHandle, out: np.ndarray, path: str) -> None:
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = fh.readinto(view)
    if got != view.nbytes:
        raise SourceError(f"{path} is truncated: a read of {view.nbytes} bytes got {got}")


# --------------------------------------------------------------------------- recordings

def plan_sources(paths: Sequence[str | Path]) -> SourcePlan:
    """Inspect every file and check that they form one recording.

    Parameters
    ----------
    paths : sequence of str or Path
        Files in recording order.

    Returns
    -------
    SourcePlan

    Raises
    ------
    SourceError
        When a file cannot be read or differs from the first in frame shape, axes or dtype.
    """
    return join_parts([part for p in paths for part in inspect_tiff(p)])


# --------------------------------------------------------------------------- writing

_OME_AXES = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


def write_tiff(rec: Recording, slabs: Iterable[np.ndarray], partials: list[Path],
               member: str | None) -> None:
    """Write a recording to an OME-TIFF (BigTIFF), one page per frame, dtype and scales
    kept; ``slabs`` are its frames in order, a few at a time."""
    if member:
        raise SourceError(f"a TIFF file has no members: drop ':{member}'")
    metadata: dict[str, object] = {"axes": "".join(_OME_AXES[a] for a in rec.axes)}
    if rec.frame_interval_s:
        metadata.update(TimeIncrement=rec.frame_interval_s, TimeIncrementUnit="s")
    size = rec.stored.pixel_size_um
    if size:
        metadata.update(PhysicalSizeY=size[0], PhysicalSizeYUnit="µm",
                        PhysicalSizeX=size[1], PhysicalSizeXUnit="µm")
    if rec.stored.z_spacing_um:
        metadata.update(PhysicalSizeZ=rec.stored.z_spacing_um, PhysicalSizeZUnit="µm")
    pages = (page for slab in slabs for page in slab.reshape(-1, *rec.shape[-2:]))
    with tifffile.TiffWriter(partials[0], bigtiff=True, ome=True) as tw:
        tw.write(pages, shape=rec.shape, dtype=rec.dtype, photometric="minisblack",
                 metadata=metadata)


def _inspect(spec: str, raw: object) -> tuple[TiffSource, ...]:
    return inspect_tiff(spec)


FORMAT = Format("tiff", TIFF_SUFFIXES, _inspect, write=write_tiff)
