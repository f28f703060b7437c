"""Recordings written by other tools, read as they are: OME-Zarr images and plain Zarr arrays.

An OME-Zarr image (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3; ome-zarr-py, ngff-zarr, bioio, …)
gives its axes, scales and full-resolution level in its ``multiscales`` metadata; a plain Zarr
array needs its axes from ``dimension_names`` (Zarr v3), ``_ARRAY_DIMENSIONS`` (xarray) or the
caller (``--axes tyx``). The axes must be ``t``, then optionally ``c`` and ``z``, then ``y, x``.

Nothing is ever written into such a store. The whole-recording statistics that training and
denoising need are computed in one streaming pass and kept in a small *sidecar* JSON file
beside the store (``NAME.zarr.deepcad-chunked.json``), or, when that folder is read-only, in
the user's cache folder. A sidecar records the store's *state* (its files' names, sizes and
modification times, and its metadata): a store changed since is summarised again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from deepcad_chunked.errors import StoreError
from deepcad_chunked.store.integrity import open_array
from deepcad_chunked.store.location import StorePath, list_files, write_atomic
from deepcad_chunked.store.omezarr import read_slabs
from deepcad_chunked.store.stats import BlockStats

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".deepcad-chunked.json"
#: The axis names a recording may have, in the only order it may have them.
AXES = ("t", "c", "z", "y", "x")
_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
#: Units of time and length converted to seconds and micrometres.
_SECONDS = {"second": 1.0, "millisecond": 1e-3, "microsecond": 1e-6, "minute": 60.0,
            "hour": 3600.0, "s": 1.0, "ms": 1e-3}
_MICROMETRES = {"micrometer": 1.0, "micrometre": 1.0, "nanometer": 1e-3, "nanometre": 1e-3,
                "millimeter": 1e3, "millimetre": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3}


def multiscales(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The first NGFF ``multiscales`` entry of a group's attributes (0.4 or 0.5), or None."""
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if isinstance(ms, list) and ms and isinstance(ms[0], dict) and ms[0].get("datasets"):
        return ms[0]
    return None


def _axis_names(entries: list[Any]) -> tuple[str, ...]:
    """Our names (t, c, z, y, x) for NGFF axis entries (dicts, or names in NGFF 0.3)."""
    names: list[str | None] = []
    for entry in entries:
        name = str(entry.get("name") if isinstance(entry, dict) else entry).lower()
        kind = entry.get("type") if isinstance(entry, dict) else None
        if name in AXES:
            names.append(name)
        elif kind == "time":
            names.append("t")
        elif kind == "channel":
            names.append("c")
        else:
            names.append(None if kind != "space" else "")
    spatial = iter(("x", "y", "z"))
    for i in reversed(range(len(names))):
        if names[i] == "":
            names[i] = next(spatial, None)
    if any(n is None for n in names):
        raise StoreError(f"axes {[e.get('name') if isinstance(e, dict) else e for e in entries]}"
                         " are not time, channel and space axes")
    return tuple(n for n in names if n is not None)


def check_axes(axes: tuple[str, ...], where: StorePath) -> None:
    """Refuse axes that are not ``t[c][z]yx``.

    Raises
    ------
    StoreError
        Naming the axes found and the ones needed.
    """
    order = [AXES.index(a) for a in axes if a in AXES]
    if (len(order) != len(axes) or order != sorted(set(order)) or axes[:1] != ("t",)
            or axes[-2:] != ("y", "x")):
        raise StoreError(f"{where} has axes {''.join(axes) or 'none'}; a recording needs "
                         "t, optionally c and z, then y and x (t[c][z]yx)")


def parse_axes(text: str) -> tuple[str, ...]:
    """``"tyx"`` or ``"t,z,y,x"`` → a tuple of axis names (checked by :func:`check_axes`)."""
    return tuple(text.replace(",", "").strip().lower())


def _scale(ms: dict[str, Any], ndim: int) -> list[float]:
    """The full-resolution level's scale: its own and the image's scale transformations."""
    scale = np.ones(ndim)
    for transforms in (ms["datasets"][0].get("coordinateTransformations") or [],
                       ms.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale") or []) == ndim:
                scale = scale * np.asarray(t["scale"], dtype=float)
    return [float(s) for s in scale]


def _physical(axes: tuple[str, ...], scale: list[float], units: dict[str, str | None]
              ) -> dict[str, Any]:
    """Frame interval and pixel sizes, where the metadata gives them in known units."""
    def value(axis: str, table: dict[str, float]) -> float | None:
        if axis not in axes:
            return None
        factor = table.get(str(units.get(axis) or "").lower())
        return scale[axes.index(axis)] * factor if factor else None

    interval = value("t", _SECONDS)
    size = (value("y", _MICROMETRES), value("x", _MICROMETRES))
    return {"frame_interval_s": interval, "frame_rate_hz": 1.0 / interval if interval else None,
            "pixel_size_um": list(size) if None not in size else None,
            "z_spacing_um": value("z", _MICROMETRES)}


@dataclasses.dataclass(frozen=True)
class Found:
    """A foreign recording's array and what its metadata says of it."""

    array: zarr.Array
    array_path: str
    axes: tuple[str, ...]
    ome: dict[str, Any]
    attrs: dict[str, Any]


def _open_array(path: StorePath, label: str) -> zarr.Array:
    try:
        # another tool may leave out chunks that hold only its fill value: not strict
        return open_array(path, strict=False, label=label)
    except Exception as exc:
        raise StoreError(f"{path}: its array cannot be opened ({exc})") from None


def _array_axes(array: zarr.Array) -> tuple[str, ...] | None:
    names = getattr(array.metadata, "dimension_names", None)
    if not names:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if names and all(isinstance(n, str) and n.lower() in AXES for n in names):
        return tuple(n.lower() for n in names)
    return None


def inspect(path: StorePath, attrs: dict[str, Any], axes: tuple[str, ...] | None) -> Found:
    """Find the recording in a foreign store: an OME-Zarr image or a plain array.

    Parameters
    ----------
    path : Path
        The store (a group with NGFF metadata, or an array).
    attrs : dict
        Its root attributes.
    axes : tuple of str, optional
        Axis names of a plain array without dimension names (``--axes``).

    Raises
    ------
    StoreError
        A group that is not an OME-Zarr image, a plain array whose axes are unknown, or axes
        that are not ``t[c][z]yx``.
    """
    ms = multiscales(attrs)
    if ms is not None:
        level = str(ms["datasets"][0].get("path", "0"))
        array = _open_array(path / level, label=str(path))
        found = _axis_names(ms.get("axes") or [])
        if axes is not None and found and axes != found:
            raise StoreError(f"{path} says its axes are {''.join(found)}, not "
                             f"{''.join(axes)}; leave --axes out")
        axes = found or axes
        if axes is None:
            raise StoreError(f"{path} names no axes; give them with --axes, e.g. --axes tyx")
        check_axes(axes, path)
        if len(axes) != array.ndim:
            raise StoreError(f"{path}: axes {''.join(axes)} do not match the "
                             f"{array.ndim} dimensions of its array {level!r}")
        scale = _scale(ms, array.ndim)
        units = {a: (e.get("unit") if isinstance(e, dict) else None)
                 for a, e in zip(axes, ms.get("axes") or [{}] * len(axes), strict=True)}
    elif any((path / m).is_file() for m in (".zarray",)) or _node_type(path) == "array":
        level = ""
        array = _open_array(path, label=str(path))
        axes = axes or _array_axes(array)
        if axes is None:
            raise StoreError(f"{path} is a Zarr array whose axes are unknown; give them with "
                             f"--axes (e.g. --axes {'tyx' if array.ndim == 3 else 'tzyx'})")
        check_axes(axes, path)
        if len(axes) != array.ndim:
            raise StoreError(f"{path}: axes {''.join(axes)} do not match the array's "
                             f"{array.ndim} dimensions")
        scale, units = [1.0] * array.ndim, {}
    else:
        raise StoreError(f"{path} is a Zarr group but neither a deepcad-chunked recording nor "
                         "an OME-Zarr image; give the path of its array (with --axes)")
    ome = {"name": path.stem, "axes": [{"name": a, **({"unit": units[a]} if units.get(a)
                                                      else {})} for a in axes],
           "datasets": [{"path": level, "coordinateTransformations": [
               {"type": "scale", "scale": scale}]}]}
    version = None
    if ms is not None:
        version = (attrs.get("ome") or {}).get("version") or ms.get("version") or "0.4"
    return Found(array=array, array_path=level, axes=axes, ome=ome,
                 attrs={"kind": "foreign", "complete": True, "ngff_version": version,
                        **_physical(axes, scale, units)})


def _node_type(path: StorePath) -> str | None:
    try:
        return json.loads((path / "zarr.json").read_text()).get("node_type")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- state, sidecar

def state(path: StorePath) -> str:
    """A fingerprint of a foreign store as it is now: every file's name, size and
    modification time (an object's size and ETag), and the bytes of its root metadata."""
    digest = hashlib.sha256()
    for name in _METADATA:
        with_meta = path / name
        if with_meta.is_file():
            digest.update(name.encode() + with_meta.read_bytes())
    for name, size, tag in list_files(path):
        digest.update(f"{name}\0{size}\0{tag}\n".encode())
    return digest.hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepcad-chunked" / "sidecars"


def sidecar_paths(path: StorePath) -> list[StorePath]:
    """Where a store's sidecar may be: beside the store, then in the user's cache folder."""
    key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32]
    return [path.with_name(path.name + SIDECAR_SUFFIX), _cache_dir() / f"{key}.json"]


def read_sidecar(path: StorePath, current: str) -> dict[str, Any] | None:
    """The sidecar of ``path`` whose recorded state is ``current``, or None."""
    for candidate in sidecar_paths(path):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("state") == current:
            return data
    return None


def write_sidecar(path: StorePath, data: dict[str, Any]) -> StorePath | None:
    """Write a sidecar atomically beside the store, else in the cache folder; None if neither
    can be written (the statistics are then computed again next time)."""
    text = json.dumps(data, indent=1).encode()
    for candidate in sidecar_paths(path):
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(candidate, text)
            return candidate
        except OSError:
            continue
    log.warning("could not keep the statistics of %s anywhere (its folder and %s are not "
                "writable): they will be computed again next time", path, _cache_dir())
    return None


def compute_statistics(array: zarr.Array, where: StorePath) -> dict[str, Any]:
    """Whole-array statistics in one streaming pass (two slabs read ahead on threads)."""
    log.info("computing the statistics of %s (%s %s), once: one pass over its samples",
             where, "×".join(map(str, array.shape)), array.dtype)
    step = max(1, int(array.chunks[0]))
    frame = int(np.prod(array.shape[1:])) * array.dtype.itemsize or 1
    step *= max(1, (64 * 2**20) // (step * frame))  # whole chunks, about 64 MiB a read
    stats = BlockStats()
    for slab in read_slabs(array, step, ahead=2):
        stats.merge(BlockStats.of(slab))
    return stats.summary(np.dtype(array.dtype))


def statistics(path: StorePath, array: zarr.Array, axes: tuple[str, ...]) -> dict[str, Any]:
    """The statistics of a foreign store: from its sidecar, or computed and kept in one."""
    current = state(path)
    kept = read_sidecar(path, current)
    if kept is not None and isinstance(kept.get("statistics"), dict):
        return kept["statistics"]
    summary = compute_statistics(array, path)
    if state(path) == current:  # not changing under us: worth keeping
        write_sidecar(path, {"store": str(path.absolute()), "axes": "".join(axes),
                             "state": current, "statistics": summary})
    return summary
