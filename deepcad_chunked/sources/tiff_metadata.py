"""Physical scales and acquisition layouts in TIFF metadata: OME-XML (parsed by tifffile),
ImageJ's metadata, the resolution tags, and ScanImage's frame data (channels, slices,
volume rate), each turned into :class:`~deepcad_chunked.sources.reader.PhysicalMetadata`.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import tifffile

from deepcad_chunked.sources.reader import PhysicalMetadata

log = logging.getLogger(__name__)

_UNIT_TO_UM = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "\\u00b5m": 1.0, "nm": 1e-3, "pm": 1e-6, "å": 1e-4,
}
_UNIT_TO_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6,
              "min": 60.0, "h": 3600.0, "ns": 1e-9}


def scanimage_framedata(tif: tifffile.TiffFile) -> dict[str, Any]:
    """ScanImage's non-varying frame data, from the file header or the first page.

    Parameters
    ----------
    tif : tifffile.TiffFile
        An open ScanImage file.

    Returns
    -------
    dict
        ``SI.*`` keys to values; empty when nothing could be parsed.
    """
    meta = tif.scanimage_metadata or {}
    framedata = dict(meta.get("FrameData") or {})
    if not framedata:
        software = tif.pages.first.software or ""
        if software.startswith("SI."):
            try:
                framedata = dict(tifffile.tifffile.matlabstr2py(software))
            except Exception:  # malformed metadata: fall back to a plain page sequence
                framedata = {}
    return framedata


def scanimage_layout(tif: tifffile.TiffFile, npages: int,
                      path: Path) -> tuple[dict[str, int], dict[str, int], PhysicalMetadata]:
    """De-interleave ScanImage pages: channels fastest, then slices, then volumes."""
    fd = scanimage_framedata(tif)
    saved = fd.get("SI.hChannels.channelSave", 1)
    channels = len(saved) if isinstance(saved, (list, tuple)) else 1
    fastz = bool(fd.get("SI.hFastZ.enable", False))
    slices = 1
    if fastz or int(finite(fd.get("SI.hStackManager.framesPerSlice"), 1)) == 1:
        slices = int(finite(fd.get("SI.hStackManager.actualNumSlices",
                                    fd.get("SI.hStackManager.numSlices")), 1))
        if fastz and not fd.get("SI.hFastZ.discardFlybackFrames", True):
            slices += int(finite(fd.get("SI.hFastZ.numDiscardFlybackFrames"), 0))
    per_frame = channels * slices
    frames = npages // per_frame
    if frames * per_frame != npages:
        log.warning("%s: %d pages are not a whole number of %d-page volumes; "
                    "the last %d pages are dropped", path.name, npages, per_frame,
                    npages - frames * per_frame)
    sizes = {"t": frames, "c": channels, "z": slices}
    strides = {"t": per_frame, "z": channels, "c": 1}
    rate = finite(fd.get("SI.hRoiManager.scanVolumeRate") if slices > 1 else None, None)
    if rate is None:
        frame_rate = finite(fd.get("SI.hRoiManager.scanFrameRate"), None)
        rate = None if frame_rate is None else frame_rate / slices
    step = finite(fd.get("SI.hStackManager.actualStackZStepSize",
                          fd.get("SI.hStackManager.stackZStepSize")), None)
    meta = PhysicalMetadata(
        frame_interval_s=None if not rate else 1.0 / float(rate),
        z_spacing_um=None if step is None or slices == 1 else abs(float(step)),
    )
    return sizes, strides, meta


def finite(value: Any, default: Any) -> Any:
    """``value`` as a finite float, else ``default``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def physical_metadata(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries
                      ) -> PhysicalMetadata:
    """Frame interval, pixel size and plane spacing from OME-XML, ImageJ metadata or the
    resolution tags, whichever the file has."""
    if tif.is_ome and tif.ome_metadata:
        try:
            return _ome_metadata(tif.ome_metadata, 0)
        except ET.ParseError:
            log.warning("%s: OME-XML could not be parsed; no physical scales read", tif.filename)
    if tif.is_imagej and tif.imagej_metadata:
        return _imagej_metadata(tif)
    return PhysicalMetadata(pixel_size_um=_resolution_um(tif.pages.first, None))


def _resolution_um(page: tifffile.TiffPage, unit_name: str | None) -> tuple[float, float] | None:
    """Pixel size (y, x) in µm from the resolution tags, or None when they carry no unit."""
    try:
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    except KeyError:
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if unit_name is not None:
        per_unit = _UNIT_TO_UM.get(unit_name.strip().lower())
    if per_unit is None:
        return None
    try:
        x = per_unit * xres[1] / xres[0]
        y = per_unit * yres[1] / yres[0]
    except (ZeroDivisionError, TypeError, IndexError):
        return None
    if unit_name is None and unit == 2 and x == 25400.0:
        return None  # 1 pixel per inch: the writer's default, not a measurement
    return (y, x)


def _imagej_metadata(tif: tifffile.TiffFile) -> PhysicalMetadata:
    meta = tif.imagej_metadata or {}
    interval = finite(meta.get("finterval"), None)
    if interval is None and finite(meta.get("fps"), None):
        interval = 1.0 / float(meta["fps"])
    unit = str(meta.get("unit", "")) or None
    size = _resolution_um(tif.pages.first, unit) if unit else None
    spacing = finite(meta.get("spacing"), None)
    scale = _UNIT_TO_UM.get(unit.lower()) if unit else None
    return PhysicalMetadata(
        frame_interval_s=interval or None,
        pixel_size_um=size,
        z_spacing_um=None if spacing is None or scale is None else spacing * scale,
    )


def _ome_metadata(xml: str, index: int) -> PhysicalMetadata:
    """Scales of image ``index`` of an OME-XML document (tifffile's parser)."""
    document = tifffile.xml2dict(xml)
    root = document.get("OME") or {}
    images = root.get("Image") if isinstance(root, dict) else None
    if isinstance(images, dict):
        images = [images]
    if not images:
        return PhysicalMetadata()
    pixels = images[min(index, len(images) - 1)].get("Pixels")
    if not isinstance(pixels, dict):
        return PhysicalMetadata()

    def length(name: str) -> float | None:
        value = finite(pixels.get(f"PhysicalSize{name}"), None)
        unit = str(pixels.get(f"PhysicalSize{name}Unit", "µm"))
        scale = _UNIT_TO_UM.get(unit.lower())
        return None if value is None or scale is None else value * scale

    interval = finite(pixels.get("TimeIncrement"), None)
    tscale = _UNIT_TO_S.get(str(pixels.get("TimeIncrementUnit", "s")).lower())
    x, y = length("X"), length("Y")
    return PhysicalMetadata(
        frame_interval_s=None if interval is None or tscale is None else interval * tscale,
        pixel_size_um=None if x is None else (y if y is not None else x, x),
        z_spacing_um=length("Z"),
    )
