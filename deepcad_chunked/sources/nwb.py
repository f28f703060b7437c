"""NWB files (the DANDI archive's format): ``file.nwb`` (its only TwoPhotonSeries or
OnePhotonSeries) or ``file.nwb:SeriesName``; local or ``https://…`` (range requests).

pynwb reads the file's structure in the driver: which series, its frame rate (``rate``, or its
timestamps, or the imaging plane's ``imaging_rate``), its pixel size (the imaging plane's
``grid_spacing``, else the series' ``field_of_view``) and the session, device and imaging plane,
which are kept with the recording so that an NWB export carries them on. The frames are then
read as the series' HDF5 dataset (:mod:`deepcad_chunked.sources.hdf5`): NWB stores them
``(t, x, y)``, read transposed to ``(t, y, x)``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources import hdf5
from deepcad_chunked.sources.reader import Format, PhysicalMetadata, require

if TYPE_CHECKING:
    from deepcad_chunked.config import RawLayout
    from deepcad_chunked.store.recording import Recording

log = logging.getLogger(__name__)

NWB_SUFFIXES = (".nwb",)
_SERIES_TYPES = ("TwoPhotonSeries", "OnePhotonSeries")
_TO_UM = {"meters": 1e6, "meter": 1e6, "m": 1e6, "millimeters": 1e3, "mm": 1e3,
          "micrometers": 1.0, "micrometer": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0,
          "nanometers": 1e-3, "nm": 1e-3}
#: Frames whose timestamps give the frame interval of a series without ``rate``.
_TIMESTAMPS_READ = 1000


def pynwb() -> Any:
    """The pynwb module, or a one-line error naming the extra to install."""
    return require("pynwb", "nwb", "reading and writing NWB")


def _series_of(nwbfile: Any) -> list[Any]:
    return [obj for obj in nwbfile.objects.values()
            if type(obj).__name__ in _SERIES_TYPES]


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _interval(series: Any) -> float | None:
    rate = _float(getattr(series, "rate", None))
    if rate:
        return 1.0 / rate
    stamps = getattr(series, "timestamps", None)
    if stamps is not None and len(stamps) > 1:
        steps = np.diff(np.asarray(stamps[:_TIMESTAMPS_READ], dtype=np.float64))
        step = _float(np.median(steps))
        if step:
            return step
    rate = _float(getattr(series.imaging_plane, "imaging_rate", None))
    return 1.0 / rate if rate else None


def _pixel_size(series: Any, height: int, width: int) -> tuple[float, float] | None:
    plane = series.imaging_plane
    spacing = getattr(plane, "grid_spacing", None)
    if spacing is not None and len(spacing) >= 2:
        scale = _TO_UM.get(str(getattr(plane, "grid_spacing_unit", "meters")).lower())
        x, y = (_float(v) for v in spacing[:2])
        if scale and x and y:
            return (y * scale, x * scale)
    fov = getattr(series, "field_of_view", None)
    if fov is not None and len(fov) >= 2:
        w, h = (_float(v) for v in fov[:2])
        if w and h:
            return (h * 1e6 / height, w * 1e6 / width)
    return None


def _text(value: Any) -> Any:
    """``value`` as JSON can hold it (NaN, NWB's "unknown" wavelength, as None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return _text(value.item())
    if isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "shape"):
        return [_text(v) for v in np.asarray(value).tolist()]
    return str(value)


def _origin(nwbfile: Any, series: Any) -> dict[str, Any]:
    """What an NWB export needs to describe the same session, device and imaging plane."""
    plane = series.imaging_plane
    channel = plane.optical_channel[0] if plane.optical_channel else None
    device = plane.device
    session = {k: _text(getattr(nwbfile, k, None)) for k in (
        "session_description", "identifier", "session_start_time", "experimenter",
        "experiment_description", "session_id", "lab", "institution")}
    return {"nwb": {
        "session": session,
        "device": {k: _text(getattr(device, k, None))
                   for k in ("name", "description", "manufacturer")},
        "imaging_plane": {k: _text(getattr(plane, k, None)) for k in (
            "name", "description", "excitation_lambda", "imaging_rate", "indicator",
            "location", "grid_spacing", "grid_spacing_unit", "origin_coords",
            "origin_coords_unit", "reference_frame")},
        "optical_channel": {k: _text(getattr(channel, k, None))
                            for k in ("name", "description", "emission_lambda")},
        "series": {"name": series.name, "type": type(series).__name__,
                   **{k: _text(getattr(series, k, None)) for k in (
                       "description", "unit", "conversion", "offset", "resolution",
                       "starting_time", "field_of_view")}},
    }}


def inspect_nwb(spec: str, raw: RawLayout | None = None) -> tuple[hdf5.Hdf5Source, ...]:
    """The imaging series a source names (``file.nwb:Name``), or the file's only one.

    Raises
    ------
    SourceError
        When the file is not readable NWB, holds no or several imaging series and the
        source names none, the series keeps its frames in external files, or is not 3-D.
    """
    module = pynwb()
    with hdf5.open_spec(spec, NWB_SUFFIXES) as (path, member, state, handle):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with module.NWBHDF5IO(file=handle, mode="r", load_namespaces=True) as io:
                    nwbfile = io.read()
                    return (_describe(path, state, handle, nwbfile, member),)
        except SourceError:
            raise
        except Exception as exc:  # pynwb/hdmf raise many types on files that are not NWB
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceError(f"{path} is not a readable NWB file ({reason})") from None


def _describe(path: str, state: Any, handle: Any, nwbfile: Any,
              member: str | None) -> hdf5.Hdf5Source:
    candidates = _series_of(nwbfile)
    if member is not None:
        named = [s for s in candidates if s.name == member]
        if not named:
            others = ", ".join(sorted(s.name for s in candidates)) or "none"
            raise SourceError(f"{path} has no imaging series {member!r} (imaging series: "
                              f"{others})")
        series = named[0]
    elif not candidates:
        raise SourceError(f"{path} holds no imaging series (TwoPhotonSeries or "
                          "OnePhotonSeries)")
    elif len(candidates) > 1:
        names = ", ".join(sorted(s.name for s in candidates))
        raise SourceError(f"{path} holds {len(candidates)} imaging series ({names}); name "
                          f"one: {Path(path).name}:{sorted(s.name for s in candidates)[0]}")
    else:
        series = candidates[0]
    where = f"{path}:{series.name}"
    if getattr(series, "external_file", None) is not None:
        raise SourceError(f"{where} keeps its frames in external files "
                          f"({series.external_file[0]}, …): convert those files instead")
    data = series.data
    if not hasattr(data, "name") or data.ndim != 3:
        raise SourceError(f"{where} holds {getattr(data, 'ndim', '?')}-D data; a recording "
                          "is a 3-D (t, x, y) series (volumes are not read)")
    height, width = int(data.shape[2]), int(data.shape[1])
    meta = PhysicalMetadata(frame_interval_s=_interval(series),
                            pixel_size_um=_pixel_size(series, height, width),
                            origin=_origin(nwbfile, series))
    return hdf5.describe(path, state, handle, data.name, kind="nwb", transposed=True,
                         metadata=meta)


# --------------------------------------------------------------------------- writing

def _frames(slabs: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for slab in slabs:
        for frame in slab:
            yield np.ascontiguousarray(frame.T)  # NWB stores (t, x, y)


def write_nwb(rec: Recording, slabs: Iterable[np.ndarray], partials: list[Path],
              member: str | None) -> None:
    """Write a new NWB file whose imaging series holds the recording, streamed frame by
    frame; the session, device and imaging plane are the source NWB file's when the
    recording came from one (kept as its ``origin``), otherwise described as unknown."""
    module = pynwb()
    if rec.axes != ("t", "y", "x"):
        raise SourceError(f"{rec.path} has axes {','.join(rec.axes)}; NWB export writes "
                          "t,y,x recordings")
    with warnings.catch_warnings():  # pynwb's deprecations of fields NWB files still carry
        warnings.simplefilter("ignore", DeprecationWarning)
        # the partial file's name ends in .partial until it is renamed
        warnings.filterwarnings("ignore", message=".*does not end in '.nwb'")
        _write(module, rec, slabs, partials[0], member)


def _write(module: Any, rec: Recording, slabs: Iterable[np.ndarray], partial: Path,
           member: str | None) -> None:
    from hdmf.backends.hdf5.h5_utils import H5DataIO
    from hdmf.data_utils import DataChunkIterator
    from pynwb.ophys import ImagingPlane, OnePhotonSeries, OpticalChannel, TwoPhotonSeries

    rate = rec.stored.frame_rate_hz
    if not rate:
        raise SourceError(f"{rec.path} has no frame rate, which an NWB series needs: pass "
                          "--frame-rate")
    origin = (rec.stored.origin or {}).get("nwb") or {}
    session, device_meta = origin.get("session", {}), origin.get("device", {})
    plane_meta, channel_meta = origin.get("imaging_plane", {}), origin.get("optical_channel", {})
    series_meta = origin.get("series", {})
    start = session.get("session_start_time")
    nwbfile = module.NWBFile(
        session_description=session.get("session_description") or "denoised recording",
        identifier=str(uuid.uuid4()),
        session_start_time=(dt.datetime.fromisoformat(start) if start
                            else dt.datetime.now(dt.timezone.utc)),
        experimenter=session.get("experimenter"),
        experiment_description=session.get("experiment_description"),
        session_id=session.get("session_id"), lab=session.get("lab"),
        institution=session.get("institution"),
    )
    device = nwbfile.create_device(name=device_meta.get("name") or "microscope",
                                   description=device_meta.get("description"),
                                   manufacturer=device_meta.get("manufacturer"))
    channel = OpticalChannel(name=channel_meta.get("name") or "channel",
                             description=channel_meta.get("description") or "unknown",
                             emission_lambda=channel_meta.get("emission_lambda") or math.nan)
    size = rec.stored.pixel_size_um
    spacing = plane_meta.get("grid_spacing")
    unit = plane_meta.get("grid_spacing_unit") or "meters"
    if spacing is None and size:
        spacing, unit = [size[1] * 1e-6, size[0] * 1e-6], "meters"
    plane = ImagingPlane(
        name=plane_meta.get("name") or "imaging_plane", optical_channel=channel,
        description=plane_meta.get("description") or "unknown", device=device,
        excitation_lambda=plane_meta.get("excitation_lambda") or math.nan,
        imaging_rate=plane_meta.get("imaging_rate") or float(rate),
        indicator=plane_meta.get("indicator") or "unknown",
        location=plane_meta.get("location") or "unknown",
        grid_spacing=spacing, grid_spacing_unit=unit,
        origin_coords=plane_meta.get("origin_coords"),
        origin_coords_unit=plane_meta.get("origin_coords_unit") or "meters",
        reference_frame=plane_meta.get("reference_frame"),
    )
    nwbfile.add_imaging_plane(plane)
    t, y, x = rec.shape
    data = DataChunkIterator(data=_frames(slabs), maxshape=(t, x, y), dtype=rec.dtype,
                             buffer_size=max(1, min(t, rec.chunks[0])))
    kind = OnePhotonSeries if series_meta.get("type") == "OnePhotonSeries" else TwoPhotonSeries
    series = kind(
        name=member or series_meta.get("name") or "TwoPhotonSeries",
        description=series_meta.get("description") or "denoised",
        data=H5DataIO(data, chunks=(max(1, min(t, rec.chunks[0])), x, y)),
        imaging_plane=plane, rate=float(rate),
        starting_time=series_meta.get("starting_time") or 0.0,
        unit=series_meta.get("unit") or "n.a.",
        conversion=series_meta.get("conversion") or 1.0,
        offset=series_meta.get("offset") or 0.0,
        field_of_view=series_meta.get("field_of_view"),
    )
    nwbfile.add_acquisition(series)
    # the file is ours to open and close: hdf5.writing_file keeps a full disk from crashing
    with hdf5.writing_file(hdf5.h5py(), partial) as handle:
        module.NWBHDF5IO(file=handle, mode="w").write(nwbfile)


FORMAT = Format("nwb", NWB_SUFFIXES, inspect_nwb, members=True, write=write_nwb)
