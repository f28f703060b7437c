"""Small recordings in HDF5, NWB, Suite2p and raw layouts, written with each format's own
library, and a loopback HTTP server (``range_server.py``) that answers range requests."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Callable, Iterator
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


@contextmanager
def http_server(folder: Path, *, ranges: bool = True
                ) -> Iterator[tuple[str, Callable[[], list[tuple[int, int]]]]]:
    """A loopback HTTP server of ``folder`` in a process of its own (answering range
    requests unless ``ranges`` is False): its base URL, and a function listing the byte
    ranges it has served.

    A separate process, as a real server is: a server thread inside the test process could
    wait for h5py's lock (a garbage-collected NWB reader closing its file) while that lock's
    holder waits for the server.
    """
    log = folder.parent / f".{folder.name}.ranges"
    log.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("range_server.py")),
                             str(folder), str(log), *([] if ranges else ["--no-ranges"])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        def served() -> list[tuple[int, int]]:
            lines = log.read_text().split() if log.exists() else []
            return [(int(a), int(b)) for a, b in (line.split("-") for line in lines)]

        yield f"http://127.0.0.1:{port}", served
    finally:
        proc.terminate()
        proc.wait(timeout=30)
