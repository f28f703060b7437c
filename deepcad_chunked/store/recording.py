"""A recording as the jobs see it: an OME-Zarr image of ours, or one written by another tool,
opened and checked (:func:`open_recording`), with its axes, attributes and statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from deepcad_chunked.errors import DamagedStoreError, IncompleteStoreError, SourceError, StoreError
from deepcad_chunked.store import foreign
from deepcad_chunked.store.attributes import StoreAttributes, parse_ours
from deepcad_chunked.store.integrity import ArrayRef, open_array
from deepcad_chunked.store.location import RemotePath, StorePath, resolve
from deepcad_chunked.store.omezarr import (
    ARRAY_PATH,
    ATTRS_KEY,
    MAX_READ_BYTES,
    is_zarr_store,
    read_group_attrs,
)


def require_numbers(dtype: Any, where: str) -> None:
    """Refuse samples that are not plain integers or floating-point numbers (complex, bool,
    strings, records): converting them would drop a part of them, or mean nothing.

    Raises
    ------
    SourceError
        Naming ``where`` and the sample type.
    """
    kind = np.dtype(dtype).kind
    if kind not in "uif":
        what = {"c": "complex", "b": "boolean (true/false)"}.get(kind, str(np.dtype(dtype)))
        raise SourceError(f"{where} holds {what} samples ({np.dtype(dtype)}); a recording "
                          "is integer or floating-point intensities")



@dataclass(frozen=True)
class Recording:
    """A recording stored as an OME-Zarr image group.

    Attributes
    ----------
    path : Path
        The store.
    array : zarr.Array
        Its full-resolution array (read-only).
    axes : tuple of str
        Axis names of ``array``.
    attrs : dict
        Our attributes (statistics, provenance, scales, completion).
    ome : dict
        The NGFF multiscales entry.
    array_path : str
        Path of the full-resolution array inside the store ("" when the store is the array).
    foreign : bool
        Written by another tool (:mod:`deepcad_chunked.store.foreign`): read as it is, never
        written into; its statistics live in a sidecar.
    """

    path: StorePath
    array: zarr.Array
    axes: tuple[str, ...]
    attrs: dict[str, Any]
    ome: dict[str, Any]
    array_path: str = ARRAY_PATH
    foreign: bool = False

    @property
    def array_url(self) -> str:
        """Where the full-resolution array is, for ``zarr.open_array``."""
        return f"{self.path}/{self.array_path}" if self.array_path else str(self.path)

    @property
    def array_ref(self) -> ArrayRef:
        """The full-resolution array as a small picklable reference, to open where it is read
        (checked as :attr:`array` is)."""
        return ArrayRef(url=self.array_url, strict=self.complete and not self.foreign)

    def with_statistics(self) -> Recording:
        """This recording with its whole-recording statistics: those of a foreign store, or of
        one of ours that has none (a denoised recording), are read from its sidecar or
        computed once (:mod:`deepcad_chunked.store.foreign`)."""
        if self.statistics is not None:
            return self
        summary = foreign.statistics(self.path, self.array, self.axes)
        return dataclasses.replace(self, attrs={**self.attrs, "statistics": summary})

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape."""
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        """Sample type."""
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Storage chunk shape."""
        return tuple(self.array.chunks)

    @property
    def shards(self) -> tuple[int, ...] | None:
        """Shard shape of a sharded Zarr v3 array, else None."""
        shards = getattr(self.array, "shards", None)
        return tuple(shards) if shards else None

    @functools.cached_property
    def stored(self) -> StoreAttributes:
        """:attr:`attrs` as the validated model (:mod:`deepcad_chunked.store.attributes`)."""
        return parse_ours(self.attrs, str(self.path))

    @property
    def complete(self) -> bool:
        """Whether the completion flag was written."""
        return self.stored.complete

    @property
    def statistics(self) -> dict[str, Any] | None:
        """Whole-recording statistics, when complete."""
        return self.stored.statistics

    def require_finite(self) -> None:
        """Refuse a recording with NaN or infinite samples (the network cannot use them).

        Raises
        ------
        StoreError
            Saying how many there are and what to do.
        """
        bad = int((self.statistics or {}).get("nonfinite") or 0)
        if bad:
            raise StoreError(f"{self.path} holds {bad} NaN or infinite samples; the network "
                             "needs finite values: replace them in the TIFF (e.g. with "
                             "numpy.nan_to_num) and convert it again")

    @property
    def frame_interval_s(self) -> float | None:
        """Seconds between time points, when known."""
        return self.stored.frame_interval_s

    @property
    def zarr_format(self) -> int:
        """2 or 3."""
        return int(self.array.metadata.zarr_format)

    def to_dask(self) -> Any:
        """The array as a dask array: one dask chunk per shard (one request, one file read)
        when the store is sharded and its shards are not huge, else per storage chunk."""
        import dask.array as da

        unit = self.shards
        if unit is None or math.prod(unit) * self.dtype.itemsize > MAX_READ_BYTES:
            unit = self.chunks
        return da.from_zarr(self.array, chunks=unit)


def open_recording(path: str | os.PathLike[str] | RemotePath, *,
                   require_complete: bool = True,
                   axes: str | tuple[str, ...] | None = None) -> Recording:
    """Open a recording: a store written by this package, an OME-Zarr image written by
    another tool, or a plain Zarr array (:mod:`deepcad_chunked.store.foreign`).

    Parameters
    ----------
    path : str, Path or RemotePath
        The OME-Zarr store or Zarr array: a local path or an fsspec URL.
    require_complete : bool
        Refuse stores of ours whose completion flag is missing (the default).
    axes : str or tuple, optional
        Axis names of a plain array without dimension names (``"tyx"``).

    Returns
    -------
    Recording
        A foreign store's statistics are there when its sidecar holds them; see
        :meth:`Recording.with_statistics`.

    Raises
    ------
    StoreError
        When ``path`` is missing, is not a Zarr store, or holds nothing that is a recording.
    IncompleteStoreError
        When a store of ours was never finished and ``require_complete`` is true.
    """
    path = resolve(path)
    names = foreign.parse_axes(axes) if isinstance(axes, str) else axes
    if not path.exists():
        raise StoreError(f"store {path} does not exist")
    if not is_zarr_store(path):
        raise StoreError(f"{path} is not a Zarr store")
    attrs = read_group_attrs(path)
    if attrs is None:
        raise StoreError(f"{path} has damaged Zarr metadata")
    ours = attrs.get(ATTRS_KEY)
    if not isinstance(ours, dict):
        found = foreign.inspect(path, attrs, names)
        require_numbers(found.array.dtype, str(path))
        kept = foreign.read_sidecar(path, foreign.state(path))
        stats = (kept or {}).get("statistics")
        return Recording(path=path, array=found.array, axes=found.axes,
                         attrs={**found.attrs, **({"statistics": stats} if stats else {})},
                         ome=found.ome, array_path=found.array_path, foreign=True)
    typed = parse_ours(ours, str(path))
    complete = typed.complete
    if require_complete and not complete:
        job = typed.job.command or "the command that wrote it"
        raise IncompleteStoreError(
            f"{path} is incomplete: {job} did not finish; rerun it to resume, "
            "or pass --overwrite to start again")
    ome = attrs.get("ome", attrs)
    ms = (ome.get("multiscales") or [{}])[0]
    found_axes = tuple(a["name"] for a in ms.get("axes", []))
    try:
        # a complete store of ours has every chunk: one missing is damage, not fill value
        array = open_array(path / ARRAY_PATH, strict=complete, label=str(path))
    except Exception as exc:
        raise StoreError(f"{path}: its array {ARRAY_PATH!r} cannot be opened ({exc})") from None
    if len(found_axes) != array.ndim:
        raise StoreError(f"{path}: axes {found_axes} do not match the array's {array.ndim} "
                         "dimensions")
    written = typed.written_shape if complete else None
    if written is not None and written != tuple(array.shape):
        raise DamagedStoreError(
            f"{path} is damaged: its array's metadata says shape {tuple(array.shape)} but "
            f"it was written with shape {written}; it cannot be trusted — write it again or "
            "restore it from a copy")
    require_numbers(array.dtype, str(path))
    return Recording(path=path, array=array, axes=found_axes, attrs=ours, ome=ms)
