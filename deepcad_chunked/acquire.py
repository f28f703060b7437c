"""A simulated acquisition: a synthetic recording written into a folder in real time.

Acquisition software (ScanImage and others) writes a recording as numbered TIFF files,
``file_00001.tif``, ``file_00002.tif``, …: each holds a fixed number of frames and is closed
when full, and the newest one grows a page at a time as frames are acquired. :func:`acquire`
does the same with the frames of :mod:`deepcad_chunked.simulate`, at a given frame rate, for
tests, demos and benchmarks of ``follow``. Each page's description records the frame's index
and the time it was written (``{"frame": k, "time": unix seconds}``).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.errors import ConfigError, OutputExistsError, SourceError
from deepcad_chunked.simulate import CHUNK, clean_chunks, detect
from deepcad_chunked.sources.growing import STOP_FILE
from deepcad_chunked.store.location import no_folder

log = logging.getLogger(__name__)


def _frames(config: SimulationConfig) -> Iterator[np.ndarray]:
    for start, photons, _ in clean_chunks(config):
        yield from detect(photons, config, start // CHUNK)


def acquire(folder: str | Path, config: SimulationConfig | None = None, *,
            rate: float | None = None, frames_per_file: int = 500, stop: bool = False,
            name: str = "file") -> int:
    """Write a simulated recording into ``folder`` as an acquisition would, in real time.

    Parameters
    ----------
    folder : str or Path
        An existing folder without TIFF files (created if its parent exists).
    config : SimulationConfig, optional
        What is simulated: frames, size, photons, seed…
    rate : float, optional
        Frames written per second; default the simulation's frame rate.
    frames_per_file : int
        Frames per file; the last file may hold fewer.
    stop : bool
        Write the file ``STOP`` into the folder after the last frame (``follow`` then
        finishes at once instead of after its idle timeout).
    name : str
        File names are ``NAME_00001.tif``, …

    Returns
    -------
    int
        Frames written.

    Raises
    ------
    OutputExistsError
        When the folder already holds TIFF files or a ``STOP`` file.
    ConfigError
        For a rate or a file size that is not positive.
    """
    config = config or SimulationConfig()
    rate = config.frame_rate if rate is None else rate
    if rate <= 0 or frames_per_file < 1:
        raise ConfigError(f"rate ({rate}) and frames per file ({frames_per_file}) must be "
                          "positive")
    folder = Path(folder).expanduser()
    if not folder.exists():
        if not folder.parent.is_dir():
            raise SourceError(f"cannot write {folder}: {no_folder(folder.parent)}")
        folder.mkdir()
    old = [p.name for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff")
           or p.name == STOP_FILE]
    if old:
        raise OutputExistsError(f"{folder} already holds {sorted(old)[0]}; acquire into an "
                                "empty folder")
    log.info("acquiring %d frames of %d×%d px at %g Hz into %s, %d per file", config.frames,
             *config.size, rate, folder, frames_per_file)
    begin = None  # the clock starts at the first frame, once the simulation has begun
    written = 0
    frames = _frames(config)
    while (first := next(frames, None)) is not None:
        path = folder / f"{name}_{written // frames_per_file + 1:05d}.tif"
        big = first.nbytes * frames_per_file > 2**31
        # unbuffered: each page reaches the file as it is written, as on a microscope
        with open(path, "xb", buffering=0) as handle, \
                tifffile.TiffWriter(handle, bigtiff=big) as writer:
            for frame in itertools.chain([first], itertools.islice(frames,
                                                                   frames_per_file - 1)):
                # frame k is written no sooner than k / rate after frame 0; a writer that
                # fell behind (a slow chunk of the simulation) catches up without waiting
                begin = time.monotonic() if begin is None else begin
                delay = begin + written / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                writer.write(frame, contiguous=False, metadata=None, photometric="minisblack",
                             description=json.dumps({"frame": written, "time": time.time()}))
                written += 1
    if stop:
        (folder / STOP_FILE).touch()
    return written
