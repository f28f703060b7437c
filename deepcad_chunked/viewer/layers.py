"""What napari shows of a recording: the stores' Zarr arrays, read lazily, their physical
scales, contrast limits from the stored statistics, and a denoised store shown like its
recording.

Nothing here reads more than the frames on screen: napari slices the Zarr array, which reads
the chunks holding those frames, and contrast limits come from the statistics stored at
conversion (never from the data, except one frame of a store that has none).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.store.location import StorePath, resolve
from deepcad_chunked.store.recording import Recording, open_recording

log = logging.getLogger(__name__)

#: Names of the stores in a ``run`` or ``follow`` folder, and their layers' names.
PRODUCTS = (("recording.zarr", "raw"), ("denoised.zarr", "denoised"))
#: The statistics' percentiles the contrast spans.
CONTRAST = ("p0.1", "p99.9")
#: Key of our entry in a layer's metadata.
META = "deepcad_chunked"

LayerData = tuple[Any, dict[str, Any], str]


def lazy_array(rec: Recording) -> Any:
    """The recording's Zarr array itself, through the store's integrity checks: napari
    slices it frame by frame, each slice reading only the storage chunks that hold it, in
    this process (not on whatever dask cluster a job of this process has started)."""
    return rec.array


def scales(rec: Recording) -> list[float]:
    """One scale per axis from the store's OME metadata (µm, s: the full-resolution level's
    scale times the image's); 1 where none is given."""
    scale = np.ones(len(rec.shape))
    for entry in (rec.ome.get("datasets", [{}]) or [{}])[0], rec.ome:
        for transform in entry.get("coordinateTransformations", []) or []:
            values = transform.get("scale") if transform.get("type") == "scale" else None
            if values is not None and len(values) == len(rec.shape):
                scale *= [float(v) if v else 1.0 for v in values]
    return [float(v) for v in scale]


def units(rec: Recording) -> list[str | None]:
    """The axes' units from the OME metadata."""
    axes = rec.ome.get("axes", [])
    found = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    return found if len(found) == len(rec.shape) else [None] * len(rec.shape)


def contrast(rec: Recording, like: Recording | None = None) -> tuple[float, float]:
    """Contrast limits: the 0.1–99.9 percentiles of ``like``'s (the recording a denoised
    store was made from) or this store's statistics; else the range of its first frame."""
    for source in (like, rec):
        stats = (source.statistics or {}) if source is not None else {}
        pct = stats.get("percentiles") or {}
        if all(k in pct for k in CONTRAST) and pct[CONTRAST[1]] > pct[CONTRAST[0]]:
            return float(pct[CONTRAST[0]]), float(pct[CONTRAST[1]])
        if stats.get("max") is not None and stats["max"] > stats["min"]:
            return float(stats["min"]), float(stats["max"])
    first = np.asarray(rec.array[(0,) * (len(rec.shape) - 2)], dtype=np.float64)
    finite = first[np.isfinite(first)]
    lo, hi = (float(np.percentile(finite, 0.1)), float(np.percentile(finite, 99.9))
              ) if finite.size else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def input_of(rec: Recording) -> Recording | None:
    """The recording a denoised store was made from, when it is still there."""
    source = rec.stored.provenance.input if not rec.foreign else None
    if not source:
        return None
    try:
        return open_recording(source)
    except DeepCADError:
        return None


def layer(rec: Recording, name: str, *, like: Recording | None = None,
          pair: str | None = None) -> LayerData:
    """One image layer of a recording, lazily, shown with ``like``'s contrast and scale."""
    shown = like or rec
    limits = contrast(rec, like)
    kwargs: dict[str, Any] = {
        "name": name, "scale": scales(shown), "contrast_limits": list(limits),
        "axis_labels": list(rec.axes), "units": units(shown),
        "metadata": {META: {"store": str(rec.path), "pair": pair or str(shown.path),
                            "role": name}},
    }
    return lazy_array(rec), kwargs, "image"


def folder_products(folder: StorePath) -> list[tuple[StorePath, str]]:
    """The stores of a ``run`` or ``follow`` output folder that exist."""
    found = []
    for store, name in PRODUCTS:
        path = folder / store
        if is_store(path):
            found.append((path, name))
    return found


def is_store(path: StorePath) -> bool:
    """Whether ``path`` is a Zarr store or group (v2 or v3)."""
    return any((path / meta).exists() for meta in ("zarr.json", ".zattrs", ".zarray",
                                                   ".zgroup"))


def read_layers(target: str | Path) -> list[LayerData]:
    """The layers of a recording store, a denoised store (shown like its recording) or a
    ``run``/``follow`` output folder (its recording and denoised stores, linked).

    Parameters
    ----------
    target : str or Path
        A local path or an fsspec URL (``s3://…``).

    Returns
    -------
    list of (data, kwargs, "image")

    Raises
    ------
    DeepCADError
        What cannot be read, in one line.
    """
    path = resolve(target)
    products = folder_products(path) if not is_store(path) else []
    if products:
        opened = {name: open_recording(p) for p, name in products}
        raw = opened.get("raw")
        return [layer(rec, name, like=raw if name != "raw" else None,
                      pair=str(raw.path) if raw is not None else None)
                for name, rec in opened.items()]
    rec = open_recording(path)
    source = input_of(rec)
    name = Path(str(path).rstrip("/")).name.removesuffix(".zarr") or "recording"
    return [layer(rec, name, like=source)]


def readable(target: str | Sequence[str]) -> str | None:
    """The path napari asked about when it is one this plugin reads, else None."""
    if not isinstance(target, str):
        if len(target) != 1:
            return None
        target = target[0]
    try:
        path = resolve(target)
        if is_store(path) or folder_products(path):
            return str(target)
    except (DeepCADError, OSError, ValueError):
        return None
    return None
