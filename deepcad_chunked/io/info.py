"""Describing a recording store: layout, sizes, scales, statistics and completeness."""

from __future__ import annotations

import math
from pathlib import Path

from deepcad_chunked.io.location import RemotePath, list_files, resolve
from deepcad_chunked.io.omezarr import open_recording


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
        "frame_rate_hz": rec.attrs.get("frame_rate_hz"),
        "frame_interval_s": rec.frame_interval_s,
        "pixel_size_um": rec.attrs.get("pixel_size_um"),
        "z_spacing_um": rec.attrs.get("z_spacing_um"),
        "statistics": rec.statistics,
        "provenance": rec.attrs.get("provenance"),
    }
