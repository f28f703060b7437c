"""Streaming a recording out of its store into the formats other tools read: OME-TIFF, HDF5,
NWB or a Suite2p plane folder (:data:`~deepcad_chunked.sources.registry.FORMATS`)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from deepcad_chunked.errors import SourceError, StoreError
from deepcad_chunked.jobs.writer_process import write_in_child
from deepcad_chunked.progress import progress_bar
from deepcad_chunked.sources.hdf5 import split_member
from deepcad_chunked.sources.reader import Format
from deepcad_chunked.sources.registry import FORMATS, file_of, format_named
from deepcad_chunked.store.location import resolve
from deepcad_chunked.store.omezarr import read_slabs
from deepcad_chunked.store.outputs import open_file
from deepcad_chunked.store.pins import StorePin
from deepcad_chunked.store.recording import Recording, open_recording

log = logging.getLogger(__name__)


#: Room kept free beyond the samples an export writes: its own metadata (an HDF5 file's
#: B-trees and attributes, an NWB file's whole description, a TIFF's page directories).
MARGIN_BYTES = 4 * 2**20


def _slabs(rec: Recording, report: Callable[[int], None], folder: Path, name: str
           ) -> Iterator[np.ndarray]:
    """The recording a chunk row at a time, the next row read ahead while one is written;
    before each row is handed to the writer, the output's filesystem must have room for it,
    and ``report`` is told its frames once it is written."""
    for slab in read_slabs(rec.array, rec.chunks[0]):
        require_room(folder, name, 2 * slab.nbytes + MARGIN_BYTES)
        yield slab
        report(slab.shape[0])


@dataclasses.dataclass(frozen=True)
class _Slabs:
    """:func:`_slabs` with its folder and name bound: sent to a writer process."""

    folder: Path
    name: str

    def __call__(self, rec: Recording, report: Callable[[int], None]) -> Iterator[np.ndarray]:
        return _slabs(rec, report, self.folder, self.name)


def require_room(folder: Path, name: str, needed: int) -> None:
    """Refuse to go on writing ``name`` into ``folder`` with less than ``needed`` bytes free.

    Raises
    ------
    StoreError
        ``no space left on ...``, with what is needed and what is free.
    """
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StoreError(f"no space left on the filesystem of {folder} to write {name} "
                         f"(it needs {needed / 2**20:.1f} MiB more, {free / 2**20:.1f} MiB "
                         "are free); nothing was kept — make room and export again")


def output_format(output: str, format: str | None) -> tuple[Format, str, str | None]:
    """The format, path and member (``out.h5:/mov``) of an export's output.

    Raises
    ------
    SourceError
        When ``format`` names no writable format.
    """
    writable = [f for f in FORMATS if f.write is not None]
    if format is not None:
        fmt = format_named(format)
    else:
        lower = file_of(output).lower()
        # another ending (or none) is written as TIFF, as export always did
        fmt = next((f for f in writable if f.suffixes and lower.endswith(f.suffixes)),
                   format_named("tiff"))
    if fmt.write is None:
        raise SourceError(f"{fmt.name} is read, not written; export formats: "
                          f"{', '.join(f.name for f in writable)}")
    path, member = split_member(output, fmt.suffixes) if fmt.members else (output, None)
    return fmt, path, member


def export(source: str | Path, output: str | Path, *, overwrite: bool = False,
           progress: bool | None = None, axes: str | None = None,
           format: str | None = None, frame_rate: float | None = None) -> Path:
    """Write a recording to a file (or Suite2p folder) of another format, out of core.

    The format is ``format`` or the output's suffix: ``.tif`` (OME-TIFF, BigTIFF, one page
    per frame), ``.h5`` (one dataset, ``out.h5:/path`` to name it), ``.nwb`` (a new NWB file
    whose imaging series keeps the source NWB file's session, device and imaging plane), or
    ``suite2p`` (a plane folder: ``data.bin`` and ``ops.npy``); any other name is TIFF.
    Each file is written under its writer lock, to a temporary name of this process's, and
    renamed when complete (a Suite2p folder's ``ops.npy`` last), so an interrupted export
    never leaves a complete-looking output and two exports to one file never mix.

    Parameters
    ----------
    source : str or Path
        A complete recording store.
    output : str or Path
        The file (or folder, for Suite2p) to write.
    overwrite : bool
        Replace an existing output.
    progress : bool, optional
        Show a progress bar; default: when standard error is a terminal.
    axes : str, optional
        Axis names of a plain Zarr array that does not name them (``"tyx"``).
    format : str, optional
        ``tiff``, ``hdf5``, ``nwb`` or ``suite2p``; default: from the output's suffix.
    frame_rate : float, optional
        Frames per second written, overriding the recording's (NWB needs one).

    Returns
    -------
    Path
        The written file or folder.

    Raises
    ------
    OutputExistsError, LockedError, StoreError, SourceError
        An existing output (without ``overwrite``), an output that is or lies inside the
        source, another export writing the same file, an unwritable folder, a source store
        rewritten while it was read, or a format that cannot hold the recording.
    """
    fmt, path, member = output_format(str(output), format)
    rec = open_recording(source, axes=axes)
    if frame_rate is not None:
        if frame_rate <= 0:
            raise SourceError(f"the frame rate must be positive, got {frame_rate}")
        rec = dataclasses.replace(rec, attrs={**rec.attrs, "frame_rate_hz": frame_rate,
                                              "frame_interval_s": 1.0 / frame_rate})
    target = resolve(path)
    if not isinstance(target, Path):
        raise StoreError(f"{target}: export writes local files (its source may be a URL)")
    files = [target / name for name in fmt.outputs] if fmt.outputs else [target]
    created = fmt.outputs and not target.exists()
    if fmt.outputs:
        if target.exists() and not target.is_dir():
            raise StoreError(f"output {target} exists and is not a folder")
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {target}: {exc.strerror or exc}") from None
    stale = sorted(p.name for p in target.glob("*.npy") if p not in files) \
        if fmt.outputs else []
    if stale and overwrite:
        log.warning("%s also holds %s from an earlier run: they describe the recording "
                    "that is being replaced", target, ", ".join(stale))
    assert fmt.write is not None
    try:
        _write(fmt, rec, files, member, overwrite, progress)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only when nothing is left in it
        raise
    size = sum(f.stat().st_size for f in files)
    log.info("exported %s frames to %s (%s, %.1f MiB)", rec.shape[0], target, fmt.name,
             size / 2**20)
    return target


def _write(fmt: Format, rec: Recording, files: list[Path], member: str | None,
           overwrite: bool, progress: bool | None) -> None:
    assert fmt.write is not None
    with contextlib.ExitStack() as stack:
        # entered last to first: the first is renamed into place first, the last marks done
        partials = [stack.enter_context(open_file(f, command="export", inputs=[rec.path],
                                                  overwrite=overwrite,
                                                  pins=[StorePin(rec.path)]))
                    for f in reversed(files)][::-1]
        bar = stack.enter_context(progress_bar(rec.shape[0], unit="frame", desc="export",
                                               progress=progress))
        folder = files[0].parent
        # the whole export first: most full disks are found before anything is written
        itemsize = 2 if fmt.name == "suite2p" else rec.dtype.itemsize  # Suite2p: int16
        require_room(folder, files[0].name, math.prod(rec.shape) * itemsize + MARGIN_BYTES)
        slabs = _Slabs(folder, files[0].name)
        try:
            if fmt.name in ISOLATED:
                write_in_child(fmt.name, rec, slabs, partials, member, bar.update,
                               lambda code: f"cannot write {files[0]}: "
                               + _died(code, folder))
            else:
                fmt.write(rec, slabs(rec, bar.update), partials, member)
        except OSError as exc:
            raise StoreError(f"cannot write {files[0]}: {_why(exc, folder)}") from None


#: Formats written by HDF5, which can crash the process on a failed write: their writer runs
#: in a process of its own (:mod:`deepcad_chunked.jobs.writer_process`).
ISOLATED = ("hdf5", "nwb")


def _died(code: int | None, folder: Path) -> str:
    """Why a writer process ended without a word."""
    if shutil.disk_usage(folder).free < MARGIN_BYTES:
        return ("no space left on its device (its HDF5 writer died of it); nothing was "
                "kept — make room and export again")
    return (f"its HDF5 writer died (exit code {code}); nothing was kept — rerun with --debug "
            "and please report it")


def _why(exc: OSError, folder: Path) -> str:
    """What an error of a writer means: a full disk for ENOSPC and EDQUOT, and for a short
    write on a filesystem with no room left (tifffile's "N requested and M written")."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or (
        "written" in str(exc) and shutil.disk_usage(folder).free < MARGIN_BYTES)
    if full:
        return "no space left on its device; nothing was kept — make room and export again"
    return exc.strerror or str(exc).splitlines()[0]
