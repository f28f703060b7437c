"""Headerless raw binary recordings (Thorlabs, custom acquisition code, Suite2p's data.bin):
the layout comes from the user (``--raw-shape T,Y,X --raw-dtype uint16 [--raw-order C]``).

A C-order file is read by positioned reads of whole frames (never memory-mapped, so a file cut
while it is read gives an error, not a crash); a Fortran-order file (t fastest) is read through
a read-only memory map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources.reader import (
    FileState,
    Format,
    PhysicalMetadata,
    PlanePart,
    check_unchanged,
)

if TYPE_CHECKING:
    from deepcad_chunked.config import RawLayout

#: File name endings taken for raw binary in a folder of sources (any file named is read).
RAW_SUFFIXES = (".raw", ".bin", ".dat")


@dataclass(frozen=True, kw_only=True)
class RawSource(PlanePart):
    """Frames stored back to back in a file (``series``: the layout read, as text; ``kind``
    ``raw`` or ``suite2p``).

    Attributes
    ----------
    file_dtype : str
        Sample type as stored (byte order included).
    order : {"C", "F"}
        Sample order of the whole ``(t, y, x)`` array.
    offset : int
        Bytes before the first sample.
    """

    file_dtype: str
    order: str
    offset: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop``, native byte order."""
        check_unchanged(self)
        stored = np.dtype(self.file_dtype)
        if self.order == "F":
            whole = np.memmap(self.path, dtype=stored, mode="r", offset=self.offset,
                              shape=(self.frames, self.height, self.width), order="F")
            data = np.array(whole[start:stop], order="C")
            del whole
        else:
            data = np.empty((stop - start, self.height, self.width), dtype=stored)
            view = memoryview(data.reshape(-1).view(np.uint8))
            at = self.offset + start * self.height * self.width * stored.itemsize
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = 0
                while done < view.nbytes:
                    got = os.preadv(fd, [view[done:]], at + done)
                    if got <= 0:
                        raise SourceError(f"{self.path} is truncated: frames {start}–"
                                          f"{stop - 1} end past the end of the file")
                    done += got
            finally:
                os.close(fd)
        check_unchanged(self)
        return data.astype(self.dtype, copy=False)


def frames_in(path: str, size: int, offset: int, frame_bytes: int, frames: int,
              layout: str) -> int:
    """The number of frames a file of ``size`` bytes holds, checked against ``frames``
    (``-1``: as many as it holds).

    Raises
    ------
    SourceError
        When the file does not hold a whole number of frames, or not ``frames`` of them.
    """
    body = size - offset
    if body <= 0:
        raise SourceError(f"{path} is {size} bytes long, no more than its header (--raw-offset "
                          f"{offset}); check the offset")
    if frames == -1:
        if body <= 0 or body % frame_bytes:
            raise SourceError(f"{path} holds {body} bytes after the header, not a whole number "
                              f"of {layout} frames ({frame_bytes} bytes each)")
        return body // frame_bytes
    if body != frames * frame_bytes:
        raise SourceError(f"{path} holds {body} bytes after the header but {frames} frames of "
                          f"{layout} are {frames * frame_bytes} bytes "
                          f"({'cut short' if body < frames * frame_bytes else 'too long'}); "
                          "check the shape and dtype")
    return frames


def describe(path: str, layout: RawLayout, *, kind: str = "raw",
             metadata: PhysicalMetadata | None = None) -> RawSource:
    """Describe a raw file of ``layout``.

    Raises
    ------
    SourceError
        When the file cannot be read or its size does not match the layout.
    """
    state = FileState.of(path)
    stored = np.dtype(layout.dtype)
    t, y, x = layout.shape
    text = f"{y}×{x} {stored}"
    frames = frames_in(path, state.size, layout.offset, y * x * stored.itemsize, t, text)
    return RawSource(path=path, **state.fields(),
                     series=f"{stored.str},{layout.order},{layout.offset},{y},{x}", kind=kind,
                     dtype=stored.newbyteorder("=").str, file_dtype=stored.str,
                     order=layout.order, offset=layout.offset, frames=frames, height=y,
                     width=x, metadata=metadata or PhysicalMetadata())


def inspect_raw(spec: str, raw: RawLayout | None) -> tuple[RawSource, ...]:
    """A raw binary file read with the given layout.

    Raises
    ------
    SourceError
        When no layout is given, or the file does not match it.
    """
    if raw is None:
        raise SourceError(f"{spec} is raw binary: give its layout with --raw-shape T,Y,X "
                          "--raw-dtype TYPE (T may be -1: as many frames as the file holds)")
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise SourceError(f"source {path} does not exist" if not path.exists()
                          else f"{path} is not a regular file")
    return (describe(str(path), raw),)


FORMAT = Format("raw", RAW_SUFFIXES, inspect_raw)
