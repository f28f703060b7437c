"""OME-Zarr image groups: creating them, describing them, and opening them for reading.

One recording is one OME-Zarr image group with its full-resolution array at path ``0``. NGFF
0.5 on Zarr v3 is the default; NGFF 0.4 on Zarr v2 is available for older viewers. Our own
attributes live under the ``deepcad_chunked`` key of the group; their ``complete`` flag is set
last, so a store without it is recognisably unfinished.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from deepcad_chunked.config import CompressionConfig
from deepcad_chunked.store.integrity import zarr_target
from deepcad_chunked.store.location import StorePath

ATTRS_KEY = "deepcad_chunked"
#: Largest shard read whole as one dask chunk (:meth:`Recording.to_dask`).
MAX_READ_BYTES = 256 * 2**20
ARRAY_PATH = "0"
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
AXIS_UNITS = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}


def blosc_codec(compression: CompressionConfig, zarr_format: int) -> Any:
    """The Blosc compressor of ``compression`` for a Zarr array of the given format."""
    c = compression
    if zarr_format == 2:
        shuffle = {"bitshuffle": numcodecs.Blosc.BITSHUFFLE,
                   "shuffle": numcodecs.Blosc.SHUFFLE,
                   "noshuffle": numcodecs.Blosc.NOSHUFFLE}[c.shuffle]
        return numcodecs.Blosc(cname=c.cname, clevel=c.clevel, shuffle=shuffle)
    return BloscCodec(cname=c.cname, clevel=c.clevel, shuffle=c.shuffle)


def multiscales(axes: tuple[str, ...], scale: list[float], units: dict[str, str | None],
                name: str, ngff_version: str) -> dict[str, Any]:
    """The NGFF ``multiscales`` entry of a single-resolution image.

    Parameters
    ----------
    axes : tuple of str
        Axis names in array order (``t``, ``c``, ``z``, ``y``, ``x``).
    scale : list of float
        Physical size of one step along each axis.
    units : dict
        Unit of each axis; axes left out or mapped to None carry no unit.
    name : str
        Name of the image.
    ngff_version : str
        ``"0.4"`` or ``"0.5"``.

    Returns
    -------
    dict
        JSON-ready metadata.
    """
    axis_list = []
    for ax in axes:
        entry: dict[str, str] = {"name": ax, "type": AXIS_TYPES[ax]}
        if units.get(ax):
            entry["unit"] = str(units[ax])
        axis_list.append(entry)
    ms: dict[str, Any] = {
        "name": name,
        "axes": axis_list,
        "datasets": [{"path": ARRAY_PATH,
                      "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }
    if ngff_version == "0.4":
        ms = {"version": "0.4", **ms}
    return ms


def ome_attributes(ms: dict[str, Any], zarr_format: int) -> dict[str, Any]:
    """Wrap a multiscales entry the way its NGFF version wants it."""
    if zarr_format == 2:
        return {"multiscales": [ms]}
    return {"ome": {"version": "0.5", "multiscales": [ms]}}


def is_zarr_store(path: StorePath) -> bool:
    """True when ``path`` is a directory holding Zarr (v2 or v3) metadata at its root."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray", ".zattrs"))


def read_group_attrs(path: StorePath) -> dict[str, Any] | None:
    """The group attributes of a Zarr store, or None when ``path`` holds none that parse."""
    try:
        if (path / "zarr.json").is_file():
            meta = json.loads((path / "zarr.json").read_text())
            return dict(meta.get("attributes", {}))
        if (path / ".zattrs").is_file():
            return dict(json.loads((path / ".zattrs").read_text()))
        if (path / ".zgroup").is_file() or (path / ".zarray").is_file():
            return {}
    except (OSError, ValueError, AttributeError):
        return None
    return None


def stored_codecs(compression: CompressionConfig, checksums: bool = True) -> tuple[Any, ...]:
    """The bytes-to-bytes codecs of a new Zarr v3 store's chunks: Blosc, then the CRC-32C
    checksum of the compressed bytes that readers verify (:mod:`deepcad_chunked.store.integrity`;
    ``benchmarks/integrity.py`` measures what it costs)."""
    blosc = blosc_codec(compression, 3)
    return (blosc, Crc32cCodec()) if checksums else (blosc,)


def create_image(path: StorePath, *, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...],
                 axes: tuple[str, ...], scale: list[float], units: dict[str, str | None],
                 zarr_format: Literal[2, 3], compression: CompressionConfig,
                 attrs: dict[str, Any], shards: tuple[int, ...] | None = None) -> zarr.Array:
    """Create an empty OME-Zarr image group at ``path`` (an existing directory holding no
    Zarr metadata; see :func:`deepcad_chunked.store.lifecycle.open_store`).

    Parameters
    ----------
    path : Path
        The store's directory.
    shape, dtype, chunks : tuple, dtype, tuple
        The full-resolution array's layout.
    axes, scale, units
        NGFF axes in array order, their step sizes and units.
    zarr_format : {2, 3}
        Zarr v3 with NGFF 0.5, or Zarr v2 with NGFF 0.4.
    compression : CompressionConfig
        The chunks' compressor; on Zarr v3 each chunk also carries a CRC-32C checksum of
        its compressed bytes (:mod:`deepcad_chunked.store.integrity`). Zarr v2, kept for
        viewers such as Fiji, has no standard checksum and goes without.
    attrs : dict
        Our own attributes, stored under ``deepcad_chunked``.
    shards : tuple, optional
        Zarr v3 shard shape (whole multiples of ``chunks``): one file per shard instead of
        one per chunk. Every writer must write whole shards.

    Returns
    -------
    zarr.Array
        The array at path ``0``, open for writing.
    """
    ngff = "0.4" if zarr_format == 2 else "0.5"
    ms = multiscales(axes, scale, units, name=path.stem, ngff_version=ngff)
    group_attrs = {**ome_attributes(ms, zarr_format), ATTRS_KEY: attrs}
    group = zarr.create_group(store=zarr_target(path, read_only=False),
                              zarr_format=zarr_format, overwrite=False, attributes=group_attrs)
    kwargs: dict[str, Any] = {
        "shape": shape, "chunks": chunks, "dtype": np.dtype(dtype),
        "compressors": blosc_codec(compression, zarr_format), "fill_value": 0,
        "config": {"write_empty_chunks": True},
    }
    if zarr_format == 2:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        kwargs["attributes"] = {"_ARRAY_DIMENSIONS": list(axes)}
    else:
        kwargs["dimension_names"] = list(axes)
        kwargs["compressors"] = stored_codecs(compression)
        if shards is not None:
            kwargs["shards"] = tuple(shards)
    return group.create_array(ARRAY_PATH, **kwargs)


def read_slabs(array: zarr.Array, step: int, ahead: int = 1) -> Iterator[np.ndarray]:
    """Yield ``array`` ``step`` frames at a time, the next ``ahead`` slabs being read on
    threads while one is used."""
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for t0 in range(0, array.shape[0], step):
            pending.append(pool.submit(lambda a, b: np.asarray(array[a:b]), t0,
                                       min(array.shape[0], t0 + step)))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@functools.lru_cache(maxsize=4)
def open_for_writing(store: str) -> zarr.Array:
    """The array at path ``0`` of a store, open for writing, cached per process.

    Every chunk is written, even all-zero ones: a finished piece of work is whole on disk,
    and zarr skips comparing each chunk with the fill value (12 % of a conversion's CPU).
    """
    # a store in an object store: every operation bounded, whatever the client does
    array = zarr.open_array(zarr_target(f"{store}/{ARRAY_PATH}", read_only=False), mode="r+")
    return array.with_config({"write_empty_chunks": True})


def update_attrs(path: StorePath, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the store's ``deepcad_chunked`` attributes and return them."""
    group = zarr.open_group(zarr_target(path, read_only=False), mode="r+")
    ours = dict(group.attrs.get(ATTRS_KEY, {}))
    ours.update(changes)
    group.attrs[ATTRS_KEY] = ours
    return ours
