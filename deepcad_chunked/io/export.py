"""Streaming a recording back to a BigTIFF for tools that only read TIFF."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

from deepcad_chunked.errors import OutputExistsError, StoreError
from deepcad_chunked.io.omezarr import Recording, open_recording

log = logging.getLogger(__name__)

_OME_AXES = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


def _slabs(rec: Recording, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """Yield the recording one chunk row at a time, reading the next while one is written."""
    step = rec.chunks[0]
    starts = range(0, rec.shape[0], step)
    pending = None
    for t0 in starts:
        future = pool.submit(lambda a, b: rec.array[a:b], t0, min(rec.shape[0], t0 + step))
        if pending is not None:
            yield pending.result()
        pending = future
    if pending is not None:
        yield pending.result()


def _pages(rec: Recording, bar: tqdm) -> Iterator[np.ndarray]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        for slab in _slabs(rec, pool):
            yield from slab.reshape(-1, *rec.shape[-2:])
            bar.update(slab.shape[0])


def export(source: str | Path, output: str | Path, *, overwrite: bool = False,
           progress: bool | None = None) -> Path:
    """Write a recording to an OME-TIFF (BigTIFF), one page per frame, dtype kept.

    The file is written under a ``.partial`` name and renamed when complete, so an
    interrupted export never leaves a complete-looking TIFF.

    Parameters
    ----------
    source : str or Path
        A complete recording store.
    output : str or Path
        The TIFF to write.
    overwrite : bool
        Replace an existing file.
    progress : bool, optional
        Show a progress bar; default: when standard error is a terminal.

    Returns
    -------
    Path
        The written file.
    """
    rec = open_recording(source)
    output = Path(output).expanduser().absolute()
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
    if output.is_dir():
        raise OutputExistsError(f"output {output} is a directory")
    if not output.parent.is_dir():
        raise StoreError(f"cannot write {output}: folder {output.parent} does not exist")
    partial = output.with_name(output.name + ".partial")
    axes = "".join(_OME_AXES[a] for a in rec.axes)
    metadata: dict[str, object] = {"axes": axes}
    if rec.frame_interval_s:
        metadata.update(TimeIncrement=rec.frame_interval_s, TimeIncrementUnit="s")
    size = rec.attrs.get("pixel_size_um")
    if size:
        metadata.update(PhysicalSizeY=size[0], PhysicalSizeYUnit="µm",
                        PhysicalSizeX=size[1], PhysicalSizeXUnit="µm")
    if rec.attrs.get("z_spacing_um"):
        metadata.update(PhysicalSizeZ=rec.attrs["z_spacing_um"], PhysicalSizeZUnit="µm")
    bar = tqdm(total=rec.shape[0], unit="frame", desc="export",
               disable=None if progress is None else not progress)
    try:
        with tifffile.TiffWriter(partial, bigtiff=True, ome=True) as tw:
            tw.write(_pages(rec, bar), shape=rec.shape, dtype=rec.dtype,
                     photometric="minisblack", metadata=metadata)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"cannot write {output}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    os.replace(partial, output)
    log.info("exported %s frames to %s (%.1f MiB)", rec.shape[0], output,
             output.stat().st_size / 2**20)
    return output
