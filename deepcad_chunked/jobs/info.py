"""Describing a recording store (layout, sizes, scales, statistics and completeness), or a
source file as ``convert`` would read it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcad_chunked.store.integrity import has_checksums, verify
from deepcad_chunked.store.location import RemotePath, list_files, resolve
from deepcad_chunked.store.recording import open_recording

if TYPE_CHECKING:
    from deepcad_chunked.config import RawLayout


def _codec_name(codec: object) -> str:
    cname = getattr(codec, "cname", None)
    if cname is None:
        return str(codec)
    shuffle = getattr(codec, "shuffle", "")
    shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}.get(shuffle, shuffle)
    value = lambda v: getattr(v, "value", v)  # noqa: E731
    return f"blosc/{value(cname)} level {getattr(codec, 'clevel', '?')} {value(shuffle)}"


def describe(path: str | Path | RemotePath, axes: str | None = None) -> dict[str, object]:
    """A JSON-ready description of a recording store, complete or not.

    Parameters
    ----------
    path : str or Path
        The store: ours, an OME-Zarr image written by another tool, or a plain Zarr array.
    axes : str, optional
        Axis names of a plain Zarr array that does not name them (``"tyx"``).

    Returns
    -------
    dict
        Shape, axes, dtype, chunks, compressor, sizes and compression ratio, scales,
        statistics, provenance, and whether it is complete.
    """
    rec = open_recording(path, require_complete=False, axes=axes)
    raw = math.prod(rec.shape) * rec.dtype.itemsize
    sizes = [size for _, size, _ in list_files(resolve(rec.array_url))]
    stored = sum(sizes)
    compressors = getattr(rec.array, "compressors", ())
    return {
        "path": str(rec.path),
        "complete": rec.complete,
        "zarr_format": rec.zarr_format,
        "ngff_version": (rec.attrs.get("ngff_version") if rec.foreign
                         else "0.4" if rec.zarr_format == 2 else "0.5"),
        "axes": list(rec.axes),
        "shape": list(rec.shape),
        "dtype": str(rec.dtype),
        "chunks": list(rec.chunks),
        "shards": list(rec.shards) if rec.shards else None,
        "files": len(sizes),
        "written_by": "another tool (read as it is)" if rec.foreign else "deepcad-chunked",
        "compressor": [_codec_name(c) for c in compressors],
        "raw_bytes": raw,
        "stored_bytes": stored,
        "compression_ratio": raw / stored if stored else None,
        "frame_rate_hz": rec.stored.frame_rate_hz,
        "frame_interval_s": rec.frame_interval_s,
        "pixel_size_um": rec.stored.pixel_size_um,
        "z_spacing_um": rec.stored.z_spacing_um,
        "statistics": rec.statistics,
        "provenance": rec.attrs.get("provenance"),
    }


def verify_store(path: str | Path | RemotePath, axes: str | None = None) -> dict[str, Any]:
    """Read every chunk of a complete store and report those missing or damaged.

    Parameters
    ----------
    path : str or Path
        The store (ours: a missing chunk is damage; another tool's: only chunks that do not
        decode are).
    axes : str, optional
        Axis names of a plain Zarr array that does not name them.

    Returns
    -------
    dict
        ``path``, ``frames``, ``rows`` (chunk rows read), ``checksums`` (whether its chunks
        carry them) and ``damaged``: one ``{"frames", "why"}`` per row that failed.

    Raises
    ------
    StoreError
        When the store cannot be opened, is incomplete, or its metadata is damaged.
    """
    rec = open_recording(path, axes=axes)
    found = verify(rec.array)
    unit = (rec.shards or rec.chunks)[0]
    return {"path": str(rec.path), "frames": rec.shape[0], "rows": -(-rec.shape[0] // unit),
            "checksums": has_checksums(rec.array),
            "damaged": [{"frames": d.frames, "why": d.why} for d in found]}


def is_source_file(path: str | Path) -> bool:
    """Whether ``path`` names a source (a file, a file's member, an ``http(s)`` URL or a
    Suite2p plane) rather than a store."""
    from deepcad_chunked.sources.registry import file_of, folder_format
    from deepcad_chunked.sources.remote import is_http

    text = str(path)
    if is_http(text):
        return True
    if isinstance(resolve(text), RemotePath):
        return False
    local = Path(file_of(text)).expanduser()
    return local.is_file() or (local.is_dir() and folder_format(local) is not None)


def describe_source(path: str | Path, raw: RawLayout | None = None) -> dict[str, Any]:
    """A JSON-ready description of what ``convert`` would read from a source.

    Parameters
    ----------
    path : str or Path
        A source file (``rec.h5:/mov``, ``rec.nwb``, a TIFF, a Suite2p plane, a URL).
    raw : RawLayout, optional
        The layout of a raw binary file.

    Returns
    -------
    dict
        Format, files, axes, shape, dtype, size, scales, and the metadata kept.

    Raises
    ------
    SourceError
        When the source cannot be read.
    """
    from deepcad_chunked.sources.registry import open_sources

    plan = open_sources([str(path)], raw)
    first = plan.first
    meta = first.metadata
    shape = [plan.frames, *first.frame_shape]
    return {
        "path": str(path),
        "source_format": first.kind,
        "files": plan.files,
        "member": first.series if isinstance(first.series, str) and first.kind in (
            "hdf5", "nwb") else None,
        "axes": list(first.axes),
        "shape": shape,
        "dtype": str(np.dtype(first.dtype)),
        "raw_bytes": math.prod(shape) * np.dtype(first.dtype).itemsize,
        "frame_rate_hz": 1.0 / meta.frame_interval_s if meta.frame_interval_s else None,
        "pixel_size_um": list(meta.pixel_size_um) if meta.pixel_size_um else None,
        "origin": meta.origin,
    }
