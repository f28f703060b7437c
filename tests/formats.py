"""Small recordings in HDF5, NWB, Suite2p and raw layouts, written with each format's own
library, and a loopback HTTP server that answers range requests."""

from __future__ import annotations

import datetime as dt
import http.server
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

#: Odd sizes: t, y, x all different, so a swapped axis shows.
SHAPE = (37, 23, 29)


def movie(dtype: str = "uint16", shape: tuple[int, int, int] = SHAPE,
          seed: int = 0) -> np.ndarray:
    """Noise with a ramp in y and a distinct offset per frame."""
    rng = np.random.default_rng(seed)
    t, y, _ = shape
    data = rng.integers(0, 3000, shape) + np.arange(t)[:, None, None] * 7 \
        + np.arange(y)[None, :, None] * 11
    return data.astype(dtype)


def write_nwb(path: Path, data: np.ndarray, *, rate: float | None = 7.5,
              series: tuple[str, ...] = ("TwoPhotonSeries",), spacing_um: float = 1.25,
              timestamps: np.ndarray | None = None) -> Path:
    """An NWB file with a session, a device, an imaging plane and imaging series holding
    ``data`` (t, y, x) in NWB's (t, x, y) order; no series at all when ``series`` is empty."""
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ophys import ImagingPlane, OpticalChannel, TwoPhotonSeries

    nwbfile = NWBFile(session_description="mouse V1, running", identifier="session-17",
                      session_start_time=dt.datetime(2026, 3, 4, 9, 30, tzinfo=dt.timezone.utc),
                      lab="Imaging Lab", institution="Somewhere", session_id="m17-s2")
    device = nwbfile.create_device(name="Scope2P", description="resonant scanner",
                                   manufacturer="Thorlabs")
    channel = OpticalChannel(name="green", description="GCaMP", emission_lambda=510.0)
    plane = ImagingPlane(name="plane0", optical_channel=channel, description="layer 2/3",
                         device=device, excitation_lambda=920.0, imaging_rate=rate or 30.0,
                         indicator="GCaMP6s", location="V1",
                         grid_spacing=[spacing_um * 1e-6, spacing_um * 1e-6],
                         grid_spacing_unit="meters")
    nwbfile.add_imaging_plane(plane)
    for name in series:
        timing = {"rate": rate} if rate else {"timestamps": timestamps}
        nwbfile.add_acquisition(TwoPhotonSeries(
            name=name, data=np.ascontiguousarray(data.transpose(0, 2, 1)),
            imaging_plane=plane, unit="a.u.", **timing))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def write_suite2p(folder: Path, data: np.ndarray, *, fs: float = 15.0,
                  nframes: int | None = None, extra: dict | None = None) -> Path:
    """A Suite2p plane folder: int16 ``data.bin`` and an ``ops.npy`` as Suite2p saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = data.astype(np.int16)
    frames.tofile(folder / "data.bin")
    ops = {"Ly": data.shape[1], "Lx": data.shape[2], "nframes": nframes or data.shape[0],
           "fs": fs, "reg_file": str(folder / "data.bin"), "meanImg": frames.mean(0),
           "date_proc": dt.datetime.now(), "save_path": str(folder), **(extra or {})}
    np.save(folder / "ops.npy", ops)
    return folder


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder's files, answering ``Range: bytes=a-b`` with 206 and the bytes."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(match[1])
        stop = min(size - 1, int(match[2])) if match[2] else size - 1
        fh = open(path, "rb")  # noqa: SIM115 (closed by copyfile's caller)
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop}/{size}")
        self.send_header("Content-Length", str(stop - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.ranges.append((start, stop))
        return _Limited(fh, stop - start + 1)


class _Limited:
    """A file read up to ``left`` bytes (what copyfile sends of a range)."""

    def __init__(self, fh, left: int) -> None:  # type: ignore[no-untyped-def]
        self.fh, self.left = fh, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves whole files only, ignoring ``Range`` (as some servers do)."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # several workers open connections at once


@contextmanager
def http_server(folder: Path, *, ranges: bool = True
                ) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """A loopback HTTP server of ``folder`` (answering range requests unless ``ranges`` is
    False): its base URL and the ranges it served."""
    served: list[tuple[int, int]] = []
    handler = type("Handler", (_RangeHandler if ranges else _QuietHandler,),
                   {"ranges": served, "timeout": 30})
    server = _Server(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=os.fspath(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
