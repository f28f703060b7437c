"""TIFF files of every supported flavour, written with tifffile for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def movie(shape: tuple[int, ...], dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    """Random samples spanning much of the dtype's range, so byte-level errors show."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        data = rng.normal(100.0, 30.0, size=shape).astype(dt)
    else:
        info = np.iinfo(dt)
        lo, hi = max(info.min, -30000), min(info.max, 60000)
        data = rng.integers(lo, hi, size=shape, endpoint=True).astype(dt)
    return data


def write_plain(path: Path, data: np.ndarray, *, bigtiff: bool = False,
                **kwargs: object) -> Path:
    """One page per frame, tifffile's shaped metadata."""
    tifffile.imwrite(path, data, bigtiff=bigtiff, photometric="minisblack", **kwargs)
    return path


def write_pages(path: Path, data: np.ndarray, **kwargs: object) -> Path:
    """One page per frame, no metadata, pages not contiguous (a description each)."""
    with tifffile.TiffWriter(path) as tw:
        for i, frame in enumerate(data):
            tw.write(frame, photometric="minisblack", metadata=None,
                     description=f"frame {i}", **kwargs)
    return path


def write_series(folder: Path, data: np.ndarray, per_file: int, stem: str = "rec_") -> list[Path]:
    """Split frames over numbered files (``rec_1.tif``, …, ``rec_10.tif``); the last shorter."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, t0 in enumerate(range(0, data.shape[0], per_file), start=1):
        paths.append(write_plain(folder / f"{stem}{k}.tif", data[t0:t0 + per_file]))
    return paths


def write_imagej(path: Path, data: np.ndarray, axes: str = "TZCYX", **meta: object) -> Path:
    """An ImageJ hyperstack."""
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": axes, **meta},
                     photometric="minisblack")
    return path


def write_ome(path: Path, data: np.ndarray, axes: str = "TYX", **meta: object) -> Path:
    """An OME-TIFF (BigTIFF)."""
    tifffile.imwrite(path, data, ome=True, bigtiff=True, photometric="minisblack",
                     metadata={"axes": axes, **meta})
    return path


def write_scanimage(path: Path, volumes: np.ndarray, *, frame_rate: float = 30.0,
                    z_step: float = 5.0) -> Path:
    """A ScanImage-style file: pages interleaved channel-fastest, then slice, then volume.

    ``volumes`` has shape (t, c, z, y, x); the non-varying metadata goes into the Software tag
    and per-frame data into the ImageDescription, as ScanImage writes them.
    """
    t, c, z = volumes.shape[:3]
    channels = "[" + ";".join(str(i + 1) for i in range(c)) + "]" if c > 1 else "1"
    software = "\n".join([
        f"SI.hChannels.channelSave = {channels}",
        f"SI.hStackManager.numSlices = {z}",
        f"SI.hStackManager.actualNumSlices = {z}",
        f"SI.hStackManager.framesPerSlice = {1 if z > 1 else t}",
        f"SI.hStackManager.stackZStepSize = {z_step}",
        f"SI.hFastZ.enable = {'true' if z > 1 else 'false'}",
        "SI.hFastZ.discardFlybackFrames = true",
        f"SI.hRoiManager.scanFrameRate = {frame_rate}",
        f"SI.hRoiManager.scanVolumeRate = {frame_rate / z}",
    ])
    pages = volumes.transpose(0, 2, 1, 3, 4).reshape(-1, *volumes.shape[-2:])
    with tifffile.TiffWriter(path) as tw:
        for i, page in enumerate(pages):
            tw.write(page, photometric="minisblack", metadata=None, software=software,
                     description=f"frameNumbers = {i + 1}\nframeTimestamps_sec = {i / frame_rate}")
    return path
