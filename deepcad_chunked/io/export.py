"""Streaming a recording back to a BigTIFF for tools that only read TIFF."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

from deepcad_chunked.errors import StoreError
from deepcad_chunked.io.lifecycle import StorePin, open_file
from deepcad_chunked.io.location import resolve
from deepcad_chunked.io.omezarr import Recording, open_recording, read_slabs

log = logging.getLogger(__name__)

_OME_AXES = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


def _pages(rec: Recording, bar: tqdm) -> Iterator[np.ndarray]:
    """The recording page by page, a chunk row read ahead while one is written."""
    for slab in read_slabs(rec.array, rec.chunks[0]):
        yield from slab.reshape(-1, *rec.shape[-2:])
        bar.update(slab.shape[0])


def export(source: str | Path, output: str | Path, *, overwrite: bool = False,
           progress: bool | None = None, axes: str | None = None) -> Path:
    """Write a recording to an OME-TIFF (BigTIFF), one page per frame, dtype kept.

    The file is written under its writer lock, to a temporary name of this process's, and
    renamed when complete, so an interrupted export never leaves a complete-looking TIFF and
    two exports to one file never mix.

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
    axes : str, optional
        Axis names of a plain Zarr array that does not name them (``"tyx"``).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    OutputExistsError, LockedError, StoreError
        An existing output (without ``overwrite``), an output that is or lies inside the
        source, another export writing the same file, an unwritable folder, or a source
        store rewritten while it was read.
    """
    rec = open_recording(source, axes=axes)
    output = resolve(output)
    if not isinstance(output, Path):
        raise StoreError(f"{output}: export writes a local TIFF file (its source may be a URL)")
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
    with open_file(output, command="export", inputs=[rec.path], overwrite=overwrite,
                   pins=[StorePin(rec.path)]) as partial:
        bar = tqdm(total=rec.shape[0], unit="frame", desc="export",
                   disable=None if progress is None else not progress)
        try:
            with tifffile.TiffWriter(partial, bigtiff=True, ome=True) as tw:
                tw.write(_pages(rec, bar), shape=rec.shape, dtype=rec.dtype,
                         photometric="minisblack", metadata=metadata)
        except OSError as exc:
            raise StoreError(f"cannot write {output}: {exc.strerror or exc}") from None
        finally:
            bar.close()
    log.info("exported %s frames to %s (%.1f MiB)", rec.shape[0], output,
             output.stat().st_size / 2**20)
    return output
