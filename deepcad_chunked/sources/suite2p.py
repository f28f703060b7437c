"""Suite2p plane folders (``…/suite2p/plane0``): ``ops.npy`` with ``data.bin`` (registered)
or ``data_raw.bin``, int16 frames of ``Ly × Lx``, in and out.

``ops.npy`` is a pickled dictionary. It is read with an unpickler that builds numpy arrays,
numbers, strings and containers only: any other class it names is stood in for by an inert
placeholder, so nothing in the file is ever run. Only ``Ly``, ``Lx``, ``nframes`` and ``fs``
are used.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcad_chunked.config import RawLayout
from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources import raw
from deepcad_chunked.sources.reader import Format, PhysicalMetadata

if TYPE_CHECKING:
    from deepcad_chunked.store.recording import Recording

log = logging.getLogger(__name__)

OPS = "ops.npy"
DB = "db.npy"
SETTINGS = "settings.npy"
#: Binary files of a plane folder, the one read first first.
BINARIES = ("data.bin", "data_raw.bin")

#: Classes an ops.npy may build: numpy's array and scalar reconstruction, and plain types.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("builtins", "slice"), ("builtins", "complex"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"),
}


class _Opaque:
    """Stands in for a class an ops.npy names but that is not read: it keeps nothing and
    runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or module.startswith("numpy.dtypes"):
            return super().find_class(module, name)
        return _Opaque


def read_ops(path: str | Path) -> dict[str, Any]:
    """The dictionary of a Suite2p ``ops.npy``, read without running code.

    Raises
    ------
    SourceError
        When the file is missing, not an ``.npy`` file, or does not hold a dictionary.
    """
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            if dtype != np.dtype(object):
                raise SourceError(f"{path} holds a {dtype} array, not Suite2p's dictionary of "
                                  "settings")
            loaded = _SafeUnpickler(fh).load()
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    except SourceError:
        raise
    except Exception as exc:  # a damaged pickle raises many types
        raise SourceError(f"{path} is not a readable Suite2p ops.npy ({exc})") from None
    value = loaded.reshape(-1)[0] if isinstance(loaded, np.ndarray) and loaded.size == 1 \
        else loaded
    if not isinstance(value, dict) or shape not in ((), (1,)):
        raise SourceError(f"{path} does not hold Suite2p's dictionary of settings")
    return value


def _int(ops: dict[str, Any], key: str, path: Path) -> int:
    try:
        value = int(ops[key])
    except (KeyError, TypeError, ValueError):
        raise SourceError(f"{path} has no {key} (a whole number), which Suite2p writes") \
            from None
    if value < 1:
        raise SourceError(f"{path} has {key} = {value}")
    return value


def _described(folder: Path) -> Path | None:
    """The file that gives a plane folder's shape: ``ops.npy``, else Suite2p ≥ 1.0's
    ``db.npy``."""
    return next((folder / n for n in (OPS, DB) if (folder / n).is_file()), None)


def is_plane(path: Path) -> bool:
    """Whether ``path`` is a Suite2p plane folder, one of its binaries, or a folder of
    plane folders."""
    if path.is_dir():
        return _described(path) is not None or any(
            _described(p) is not None for p in path.glob("plane*") if p.is_dir())
    return path.name in BINARIES and _described(path.parent) is not None


def inspect_suite2p(spec: str, layout: RawLayout | None = None) -> tuple[raw.RawSource, ...]:
    """The frames of a plane folder (or of one of its binaries), shape from ``ops.npy``
    (or ``db.npy``), frame rate from it (or ``settings.npy``).

    Raises
    ------
    SourceError
        When ops.npy is unreadable or incomplete, no binary is there, or the binary's size
        disagrees with the shape in ops.npy.
    """
    path = Path(spec).expanduser().resolve()
    folder = path if path.is_dir() else path.parent
    ops_path = _described(folder)
    if ops_path is None:
        planes = sorted(p.name for p in path.glob("plane*") if _described(p) is not None)
        raise SourceError(f"{path} holds {len(planes)} Suite2p planes ({', '.join(planes)}); "
                          f"convert one plane folder: {path / planes[0]}")
    ops = read_ops(ops_path)
    if "fs" not in ops and (folder / SETTINGS).is_file():
        ops["fs"] = read_ops(folder / SETTINGS).get("fs")
    height, width = _int(ops, "Ly", ops_path), _int(ops, "Lx", ops_path)
    if path.is_dir():
        binary = next((folder / b for b in BINARIES if (folder / b).is_file()), None)
        if binary is None:
            raise SourceError(f"{folder} has {ops_path.name} but no {' or '.join(BINARIES)}")
    else:
        binary = path
    frames = int(ops["nframes"]) if "nframes" in ops else -1
    rate = ops.get("fs")
    try:
        interval = 1.0 / float(rate) if rate and float(rate) > 0 else None
    except (TypeError, ValueError):
        interval = None
    frame_bytes = height * width * 2
    size = binary.stat().st_size
    if (frames == -1 and size % frame_bytes) or (frames != -1 and size != frames * frame_bytes):
        said = f"{frames} frames of " if frames != -1 else ""
        raise SourceError(f"{ops_path} says {said}{height}×{width} int16 frames "
                          f"({frames * frame_bytes if frames != -1 else frame_bytes} bytes"
                          f"{'' if frames != -1 else ' each'}) but {binary.name} holds {size} "
                          "bytes")
    part = raw.describe(str(binary), RawLayout(shape=(frames, height, width), dtype="int16"),
                        kind="suite2p", metadata=PhysicalMetadata(frame_interval_s=interval))
    return (part,)


# --------------------------------------------------------------------------- writing

def _range(rec: Recording) -> tuple[float, float]:
    stats = rec.statistics or {}
    if stats.get("min") is not None and stats.get("max") is not None:
        return float(stats["min"]), float(stats["max"])
    from deepcad_chunked.store.omezarr import read_slabs

    lo, hi = np.inf, -np.inf
    for slab in read_slabs(rec.array, rec.chunks[0]):
        lo, hi = min(lo, float(np.nanmin(slab))), max(hi, float(np.nanmax(slab)))
    return lo, hi


def int16_divisor(lo: float, hi: float) -> int:
    """The smallest power of two that brings samples in ``[lo, hi]``, rounded, into int16."""
    info = np.iinfo(np.int16)
    divisor = 1
    while np.rint(hi / divisor) > info.max or np.rint(lo / divisor) < info.min:
        divisor *= 2
    return divisor


def write_suite2p(rec: Recording, slabs: Iterable[np.ndarray], partials: list[Path],
                  member: str | None) -> None:
    """Write a plane folder that Suite2p runs from detection on: ``data.bin`` (int16
    frames), ``db.npy`` and ``settings.npy`` (what Suite2p ≥ 1.0 reads from a plane folder)
    and, last, ``ops.npy`` (what earlier versions read), with the shape, frame rate, crop
    ranges, mean image and paths of a registered plane.

    Samples are rounded to integers; a recording beyond int16 is divided by the smallest
    power of two that fits (Suite2p halves uint16 data the same way), recorded as
    ``deepcad_divisor`` in ``ops.npy`` and ``db.npy``.
    """
    if rec.axes != ("t", "y", "x"):
        raise SourceError(f"{rec.path} has axes {','.join(rec.axes)}; Suite2p export writes "
                          "t,y,x recordings")
    data_part, db_part, settings_part, ops_part = partials
    t, y, x = rec.shape
    divisor = int16_divisor(*_range(rec))
    if divisor > 1:
        log.warning("samples span beyond int16: divided by %d for Suite2p (recorded as "
                    "deepcad_divisor in ops.npy)", divisor)
    if rec.dtype.kind == "f":
        log.info("samples rounded to integers for Suite2p's int16 binary")
    total = np.zeros((y, x), dtype=np.float64)
    with open(data_part, "wb") as fh:
        for slab in slabs:
            if divisor > 1 or slab.dtype.kind == "f":
                frames = np.rint(slab.astype(np.float64) / divisor).astype(np.int16)
            else:
                frames = slab.astype(np.int16)
            total += frames.sum(axis=0, dtype=np.float64)
            fh.write(frames.tobytes())
    folder = data_part.parent
    db: dict[str, Any] = {
        "Ly": y, "Lx": x, "nframes": t, "nchannels": 1, "nplanes": 1, "iplane": 0,
        "keep_movie_raw": False, "input_format": "binary", "save_path": str(folder),
        "save_path0": str(folder.parent.parent), "save_folder": folder.parent.name,
        "data_path": [str(folder)], "reg_file": str(folder / BINARIES[0]),
        "db_path": str(folder / DB), "settings_path": str(folder / SETTINGS),
        "deepcad_divisor": divisor,
    }
    settings: dict[str, Any] = {}
    if rec.stored.frame_rate_hz:
        settings["fs"] = float(rec.stored.frame_rate_hz)
    ops = {**db, **settings, "functional_chan": 1, "do_registration": 0, "yrange": [0, y],
           "xrange": [0, x], "meanImg": (total / t).astype(np.float32)}
    for part, value in ((db_part, db), (settings_part, settings), (ops_part, ops)):
        with open(part, "wb") as fh:  # a file object: np.save would add ".npy" to a name
            np.save(fh, np.array(value, dtype=object), allow_pickle=True)


FORMAT = Format("suite2p", (), inspect_suite2p, folder=is_plane, write=write_suite2p,
                outputs=(BINARIES[0], DB, SETTINGS, OPS))
