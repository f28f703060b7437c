"""Reading the frames of a recording that is still being written: a folder of TIFF files.

Acquisition software (ScanImage, Bruker, Thorlabs) writes a recording as numbered TIFF files,
each closed when full, the newest growing a page at a time. :class:`GrowingTiff` keeps an
index of one file's pages that it extends as the file grows, walking the chain of image file
directories (IFDs) from where it stopped. A page counts as complete only when the writer has
moved past it: the next IFD has been started, or the file is finished (a newer file exists,
or the acquisition ended). Writers differ in what they write first (tifffile writes a page's
data before its IFD and links the IFD from the previous page before either; ScanImage writes
the IFD first), and a page taken any earlier could be read half written.

:class:`FolderWatch` follows the files of a folder in natural order and hands out the frames
that became complete since it last looked, refusing files that are replaced, written out of
order, or hold frames of another shape or type.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources.reader import natural_key
from deepcad_chunked.sources.tiff import TIFF_SUFFIXES, TiffSource, describe_growing

log = logging.getLogger(__name__)

#: Name of the file whose appearance in the watched folder ends the acquisition.
STOP_FILE = "STOP"

#: Bytes of one value of each TIFF field type.
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
               13: 4, 16: 8, 17: 8, 18: 8}
_TYPE_CODES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q",
               18: "Q"}
_SAMPLE_KINDS = {1: "u", 2: "i", 3: "f"}


@dataclass(frozen=True)
class Page:
    """Where one uncompressed page's samples are, and what they are."""

    index: int
    height: int
    width: int
    dtype: str  # with the file's byte order
    strips: tuple[tuple[int, int], ...]  # (offset, bytes)

    @property
    def end(self) -> int:
        """The file offset just past the page's last sample."""
        return max(o + n for o, n in self.strips)


@dataclass
class GrowingTiff:
    """The complete pages of one TIFF file that may still be growing.

    Attributes
    ----------
    path : Path
        The file.
    ino : int
        Its inode when first seen: a file replaced under the same name is refused.
    pages : list of Page
        The complete pages found so far, in order.
    """

    path: Path
    ino: int = -1
    pages: list[Page] = field(default_factory=list)
    _order: str = field(default="", repr=False)
    _big: bool = field(default=False, repr=False)
    _ifds: list[int] = field(default_factory=list, repr=False)
    _size: int = field(default=0, repr=False)
    #: scanned whole after its writer finished: nothing more will come
    closed: bool = field(default=False, repr=False)

    def scan(self, finished: bool) -> int:
        """Extend the index with what the file holds now; returns the number of complete pages.

        Parameters
        ----------
        finished : bool
            The writer is done with the file: its last page must be whole.

        Raises
        ------
        SourceError
            When the file was replaced or shrank, is not a TIFF, holds pages that cannot be a
            frame (compressed, tiled, several samples), or — when ``finished`` — ends in a
            half-written page.
        """
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SourceError(f"{self.path} disappeared while the recording was being read "
                              f"({exc.strerror or exc})") from None
        if self.ino == -1:
            self.ino = st.st_ino
        if st.st_ino != self.ino or st.st_size < self._size:
            raise SourceError(f"{self.path} was replaced or truncated while it was being "
                              "read; the outputs are left incomplete")
        self._size = st.st_size
        with open(self.path, "rb") as fh:
            if not self._order and not self._header(fh, finished):
                return 0
            self._walk(fh)
            last = len(self._ifds) if finished else len(self._ifds) - 1
            while len(self.pages) < last:
                page = self._page(fh, len(self.pages))
                if page.end > self._size:
                    raise SourceError(
                        f"{self.path} ends in a half-written page: page {page.index + 1} needs "
                        f"bytes up to {page.end}, the file has {self._size}; the outputs are "
                        "left incomplete")
                self.pages.append(page)
        if finished and not self._ifds:
            raise SourceError(f"{self.path} holds no complete page")
        return len(self.pages)

    def _header(self, fh: Any, finished: bool) -> bool:
        head = fh.read(16)
        if len(head) < 8:
            if finished:
                raise SourceError(f"{self.path} is not a TIFF file ({len(head)} bytes)")
            return False
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        version = struct.unpack(f"{order or '<'}H", head[2:4])[0]
        if order is None or version not in (42, 43):
            raise SourceError(f"{self.path} is not a TIFF file")
        self._order, self._big = order, version == 43
        if self._big:
            first = struct.unpack(f"{order}Q", head[8:16])[0] if len(head) == 16 else 0
        else:
            first = struct.unpack(f"{order}I", head[4:8])[0]
        if not first:
            self._order = ""  # a BigTIFF header not written yet
            return False
        self._ifds = [first]
        if not self._started(fh, first):
            self._ifds = []
            self._order = ""
            return False
        return True

    @property
    def _sizes(self) -> tuple[int, int, int]:
        """Bytes of an IFD's entry count, of one entry, and of an offset (or inline value)."""
        return (8, 20, 8) if self._big else (2, 12, 4)

    def _count(self, fh: Any, offset: int) -> int:
        """The entry count of the IFD at ``offset``."""
        fh.seek(offset)
        return struct.unpack(f"{self._order}{'Q' if self._big else 'H'}",
                             fh.read(self._sizes[0]))[0]

    def _offset(self, raw: bytes) -> int:
        return struct.unpack(f"{self._order}{'Q' if self._big else 'I'}", raw)[0]

    def _started(self, fh: Any, offset: int) -> bool:
        """Whether the IFD at ``offset`` is written whole (a hole or a tail reads as not)."""
        count_size, entry_size, next_size = self._sizes
        if offset + count_size > self._size:
            return False
        count = self._count(fh, offset)
        return count > 0 and offset + count_size + count * entry_size + next_size <= self._size

    def _walk(self, fh: Any) -> None:
        count_size, entry_size, next_size = self._sizes
        while self._ifds:
            last = self._ifds[-1]
            fh.seek(last + count_size + self._count(fh, last) * entry_size)
            following = self._offset(fh.read(next_size))
            if not following or not self._started(fh, following):
                return
            if following in self._ifds:
                raise SourceError(f"{self.path} is damaged: its pages form a loop")
            self._ifds.append(following)

    def _tags(self, fh: Any, offset: int) -> dict[int, tuple[int, ...]]:
        _, entry_size, inline = self._sizes
        count = self._count(fh, offset)
        raw = fh.read(count * entry_size)
        tags: dict[int, tuple[int, ...]] = {}
        for i in range(count):
            entry = raw[i * entry_size:(i + 1) * entry_size]
            tag, kind = struct.unpack(f"{self._order}HH", entry[:4])
            n = self._offset(entry[4:4 + inline])
            if kind not in _TYPE_CODES:
                continue  # text, rationals, floats: nothing a frame's layout needs
            nbytes = n * _TYPE_SIZES[kind]
            value = entry[4 + inline:]
            if nbytes > inline:
                fh.seek(self._offset(value))
                value = fh.read(nbytes)
                if len(value) < nbytes:
                    raise SourceError(f"{self.path} ends in a half-written page (page "
                                      "values run past the end of the file)")
            tags[tag] = struct.unpack(f"{self._order}{n}{_TYPE_CODES[kind]}", value[:nbytes])
        return tags

    def _page(self, fh: Any, index: int) -> Page:
        tags = self._tags(fh, self._ifds[index])
        where = f"{self.path}, page {index + 1}"

        def one(tag: int, default: int | None = None) -> int:
            values = tags.get(tag)
            if not values:
                if default is None:
                    raise SourceError(f"{where}: required TIFF tag {tag} is missing")
                return default
            return int(values[0])

        if one(259, 1) != 1:
            raise SourceError(f"{where} is compressed; follow reads uncompressed pages (as "
                              "acquisition software writes them): convert the finished files "
                              "instead")
        if 322 in tags or 324 in tags:
            raise SourceError(f"{where} is tiled; follow reads pages stored in strips")
        if one(277, 1) != 1:
            raise SourceError(f"{where} holds {one(277)} samples per pixel; only single-sample "
                              "(grayscale) frames are supported")
        if one(254, 0) & 1:
            raise SourceError(f"{where} is a reduced-resolution image, not a frame")
        bits = one(258, 1)
        kind = _SAMPLE_KINDS.get(one(339, 1))
        if kind is None or bits not in (8, 16, 32, 64) or (kind == "f" and bits < 32):
            raise SourceError(f"{where} holds {bits}-bit samples of format {one(339, 1)}, "
                              "which are not supported")
        offsets, counts = tags.get(273), tags.get(279)
        if not offsets or not counts or len(offsets) != len(counts):
            raise SourceError(f"{where} has no image data")
        height, width = one(257), one(256)
        dtype = np.dtype(f"{self._order}{kind}{bits // 8}")
        if sum(counts) != height * width * dtype.itemsize:
            raise SourceError(f"{where} holds {sum(counts)} bytes of samples, not the "
                              f"{height * width * dtype.itemsize} of {height}×{width} "
                              f"{dtype.name} pixels")
        return Page(index=index, height=height, width=width, dtype=dtype.str,
                    strips=tuple(zip(map(int, offsets), map(int, counts), strict=True)))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Pages ``start:stop`` (complete ones) as frames ``(n, y, x)``, native byte order."""
        pages = self.pages[start:stop]
        first = pages[0]
        out = np.empty((len(pages), first.height, first.width), dtype=np.dtype(first.dtype))
        flat = out.reshape(len(pages), -1).view(np.uint8)
        with open(self.path, "rb") as fh:
            for k, page in enumerate(pages):
                at = 0
                for offset, nbytes in page.strips:
                    fh.seek(offset)
                    got = fh.readinto(memoryview(flat[k, at:at + nbytes]))
                    if got != nbytes:
                        raise SourceError(f"{self.path} was truncated while it was read")
                    at += nbytes
        return out.astype(out.dtype.newbyteorder("="), copy=False)


@dataclass(frozen=True)
class FrameFormat:
    """Shape and sample type of a recording's frames."""

    height: int
    width: int
    dtype: str  # native byte order

    def describe(self) -> str:
        """``128×128 uint16``."""
        return f"{self.height}×{self.width} {np.dtype(self.dtype).name}"


@dataclass
class FolderWatch:
    """The TIFF files of a folder being filled by an acquisition, followed in natural order.

    Attributes
    ----------
    folder : Path
        The watched folder.
    pattern : str or None
        A glob on file names (``*_Ch1_*.tif``); default every TIFF file.
    files : list of GrowingTiff
        The files seen, in order.
    taken : list of int
        Frames handed out from each file.
    """

    folder: Path
    pattern: str | None = None
    files: list[GrowingTiff] = field(default_factory=list)
    taken: list[int] = field(default_factory=list)
    format: FrameFormat | None = None

    @property
    def frames(self) -> int:
        """Frames handed out so far."""
        return sum(self.taken)

    def stop_requested(self) -> bool:
        """Whether the file ``STOP`` appeared in the folder."""
        return (self.folder / STOP_FILE).exists()

    def _listing(self) -> list[Path]:
        try:
            names = os.listdir(self.folder)
        except OSError as exc:
            raise SourceError(f"cannot read the folder {self.folder}: "
                              f"{exc.strerror or exc}") from None
        chosen = [n for n in names if Path(n).suffix.lower() in TIFF_SUFFIXES
                  and not n.startswith(".")
                  and (self.pattern is None or fnmatch.fnmatch(n, self.pattern))]
        return sorted((self.folder / n for n in chosen), key=natural_key)

    def poll(self, ended: bool = False) -> np.ndarray | None:
        """The frames that became complete since the last call, or None.

        Parameters
        ----------
        ended : bool
            The acquisition is over: every file, the newest too, must be whole.

        Raises
        ------
        SourceError
            A file replaced, truncated or written out of order, or frames of another shape
            or type than the first ones.
        """
        listing = self._listing()
        known = {f.path for f in self.files}
        new = [p for p in listing if p not in known]
        if self.files and new and natural_key(new[0]) < natural_key(self.files[-1].path):
            raise SourceError(f"{new[0].name} appeared after {self.files[-1].path.name} had "
                              "been read, but comes before it: the files of a recording must "
                              "be written in order")
        for path in new:
            self.files.append(GrowingTiff(path))
            self.taken.append(0)
        missing = [f.path for f in self.files if f.path not in set(listing)]
        if missing:
            raise SourceError(f"{missing[0]} was removed while the recording was being read")
        out = []
        for k, growing in enumerate(self.files):
            if growing.closed:
                continue
            finished = ended or k < len(self.files) - 1
            complete = growing.scan(finished)
            growing.closed = finished
            if complete > self.taken[k]:
                out.append(self._checked(growing, growing.read(self.taken[k], complete)))
                self.taken[k] = complete
        return np.concatenate(out) if out else None

    def _checked(self, growing: GrowingTiff, frames: np.ndarray) -> np.ndarray:
        found = FrameFormat(frames.shape[1], frames.shape[2], frames.dtype.str)
        if self.format is None:
            self.format = found
        elif found != self.format:
            raise SourceError(f"{growing.path.name} holds frames of {found.describe()}, but the "
                              f"recording's are {self.format.describe()}; a recording's files "
                              "must all match")
        return frames

    def describe(self) -> TiffSource | None:
        """The layout and metadata of the first file, from what it holds now (None while
        it cannot be parsed yet; see :func:`~deepcad_chunked.sources.tiff.describe_growing`)."""
        return describe_growing(self.files[0].path) if self.files else None

    def state(self) -> list[dict[str, Any]]:
        """What has been read from each file (to resume from)."""
        return [{"name": f.path.name, "ino": f.ino, "frames": n}
                for f, n in zip(self.files, self.taken, strict=True)]

    def restore(self, state: list[dict[str, Any]]) -> None:
        """Continue after ``state`` (from :meth:`state`): the same files, still holding at
        least the frames already read.

        Raises
        ------
        SourceError
            When a file read before is gone, was replaced, or now holds fewer frames.
        """
        for k, entry in enumerate(state):
            path = self.folder / entry["name"]
            growing = GrowingTiff(path)
            if not path.exists():
                raise SourceError(f"{path} was read before the interruption but is gone")
            growing.scan(finished=k < len(state) - 1)
            if len(growing.pages) < entry["frames"]:  # all of it was read: the run had ended
                growing.scan(finished=True)
            growing.closed = k < len(state) - 1
            if growing.ino != entry["ino"] or len(growing.pages) < entry["frames"]:
                raise SourceError(f"{path} was replaced since it was read (before the "
                                  "interruption); pass --overwrite to start again")
            self.files.append(growing)
            self.taken.append(int(entry["frames"]))
        if self.files:
            sample = self.files[0].read(0, 1)
            self.format = FrameFormat(sample.shape[1], sample.shape[2], sample.dtype.str)

    def read_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` of those handed out, read again from its file."""
        for growing, n in zip(self.files, self.taken, strict=True):
            if index < n:
                return growing.read(index, index + 1)[0]
            index -= n
        raise IndexError(index)
