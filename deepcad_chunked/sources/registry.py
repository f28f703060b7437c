"""The source formats, and finding and opening the sources of one recording.

Each format is one module exposing ``FORMAT`` (:class:`~deepcad_chunked.sources.reader.Format`);
adding a format is writing that module and adding it to :data:`FORMATS`.

A source is a file (``rec.tif``), a file's member (``rec.h5:/mov``, ``rec.nwb:Series``), an
``http(s)://`` URL of an HDF5 or NWB file, a Suite2p plane folder, a glob pattern, or a folder
of files of one format.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources import hdf5, nwb, raw, suite2p, tiff
from deepcad_chunked.sources.growing import FolderWatch
from deepcad_chunked.sources.reader import Format, SourcePlan, join_parts, natural_key
from deepcad_chunked.sources.remote import is_http
from deepcad_chunked.store.omezarr import is_zarr_store

if TYPE_CHECKING:
    from deepcad_chunked.config import RawLayout

__all__ = ["FORMATS", "GLOB_CHARS", "discover_sources", "file_of", "folder_format",
           "format_named", "format_of", "natural_key", "open_sources", "watch_folder"]

#: The formats read and written, in the order a folder's files are matched against them.
FORMATS: tuple[Format, ...] = (
    tiff.FORMAT,
    hdf5.FORMAT,
    nwb.FORMAT,
    suite2p.FORMAT,
    raw.FORMAT,
)

GLOB_CHARS = re.compile(r"[*?\[]")
#: Formats whose files a folder of sources contributes (raw binary only with a layout).
_FOLDER_FORMATS = ("tiff", "hdf5", "nwb")


def format_named(name: str) -> Format:
    """The format called ``name`` (``tiff``/``tif``, ``hdf5``/``h5``, ``nwb``, ``suite2p``).

    Raises
    ------
    SourceError
        For an unknown name.
    """
    aliases = {"tif": "tiff", "h5": "hdf5"}
    for fmt in FORMATS:
        if fmt.name == aliases.get(name.lower(), name.lower()):
            return fmt
    raise SourceError(f"unknown format {name!r}; formats: "
                      f"{', '.join(f.name for f in FORMATS)}")


def _by_suffix(name: str) -> Format | None:
    lower = name.lower()
    return next((f for f in FORMATS if f.suffixes and lower.endswith(f.suffixes)), None)


def file_of(spec: str | Path) -> str:
    """The file (or URL, or folder) a source names, without its ``:member``."""
    text = str(spec)
    for fmt in FORMATS:
        if fmt.members:
            path, member = hdf5.split_member(text, fmt.suffixes)
            if member is not None:
                return path
    return text


def folder_format(path: Path) -> Format | None:
    """The format whose sources are folders (or files in one), that claims ``path``: a
    Suite2p plane."""
    return next((f for f in FORMATS if f.folder is not None and f.folder(path)), None)


def format_of(spec: str | Path, raw_layout: RawLayout | None = None) -> Format:
    """The format that reads source ``spec``.

    Raises
    ------
    SourceError
        When no format reads it.
    """
    text = str(spec)
    name = file_of(text)
    claimed = None if is_http(text) else folder_format(Path(name))
    if claimed is not None:
        return claimed
    if raw_layout is not None:
        return raw.FORMAT
    found = _by_suffix(name)
    if found is None and is_http(text):
        from deepcad_chunked.sources.remote import holds_hdf5

        if holds_hdf5(text):  # an archive's download URL names no file (DANDI's): NWB
            return nwb.FORMAT
    if found is None:
        raise SourceError(f"{text}: unknown format; sources are TIFF (.tif, .tiff, .btf), HDF5 "
                          "(.h5, .hdf5), NWB (.nwb), a Suite2p plane folder, or raw binary "
                          "(--raw-shape T,Y,X --raw-dtype TYPE)")
    return found


def discover_sources(sources: Sequence[str | Path] | str | Path,
                     raw_layout: RawLayout | None = None) -> list[str]:
    """Expand files, members, URLs, glob patterns and folders into one naturally sorted list.

    Parameters
    ----------
    sources : source, or a sequence of them
        A folder contributes its files of one format (not recursively), or is itself one
        source (a Suite2p plane folder); a pattern its matches.
    raw_layout : RawLayout, optional
        Read the files as raw binary of this layout (a folder contributes its ``.raw``,
        ``.bin`` and ``.dat`` files).

    Returns
    -------
    list of str
        Absolute, de-duplicated sources in natural sort order (``file_1, file_2, …``).

    Raises
    ------
    SourceError
        When a path does not exist, a pattern or folder matches no readable file, a folder
        mixes formats, or nothing is given.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: list[str] = []
    for item in sources:
        found.extend(_expand_one(str(item), raw_layout))
    if not found:
        raise SourceError("no source files given")
    return sorted(dict.fromkeys(found), key=natural_key)


def _expand_one(item: str, raw_layout: RawLayout | None) -> Iterable[str]:
    if is_http(item):
        return [item]
    name = file_of(item)
    member = item[len(name):]
    path = Path(name).expanduser()
    if path.is_dir():
        if is_zarr_store(path):
            raise SourceError(f"{path} is a Zarr store, not source files: train, denoise and "
                              f"export read it as it is (see: deepcad-chunked info {path})")
        if folder_format(path) is not None:
            return [str(path.resolve())]
        return _folder_files(path, raw_layout)
    if path.exists():
        if not path.is_file():
            raise SourceError(f"{path} is not a regular file")
        return [str(path.resolve()) + member]
    if GLOB_CHARS.search(name):
        matches = [Path(m) for m in glob.glob(str(path)) if Path(m).is_file()]
        if not matches:
            raise SourceError(f"pattern {item!r} matches no file")
        return [str(m.resolve()) + member for m in matches]
    raise SourceError(f"source {path} does not exist")


def _folder_files(path: Path, raw_layout: RawLayout | None) -> list[str]:
    files = [p for p in path.iterdir() if p.is_file()]
    if raw_layout is not None:
        chosen = [p for p in files if p.suffix.lower() in raw.RAW_SUFFIXES]
        if not chosen:
            raise SourceError(f"directory {path} contains no raw files "
                              f"({', '.join('*' + s for s in raw.RAW_SUFFIXES)})")
        return [str(p.resolve()) for p in chosen]
    kinds: dict[str, list[Path]] = {}
    for p in files:
        fmt = _by_suffix(p.name)
        if fmt is not None and fmt.name in _FOLDER_FORMATS:
            kinds.setdefault(fmt.name, []).append(p)
    if not kinds:
        raise SourceError(f"directory {path} contains no recording files (*.tif, *.tiff, "
                          "*.h5, *.nwb)")
    if len(kinds) > 1:
        raise SourceError(f"directory {path} mixes {' and '.join(sorted(kinds))} files; name "
                          "the files of one recording (a glob pattern)")
    return [str(p.resolve()) for p in next(iter(kinds.values()))]


def open_sources(sources: Sequence[str | Path] | str | Path,
                 raw_layout: RawLayout | None = None) -> SourcePlan:
    """Find, inspect and join the sources of one recording.

    Parameters
    ----------
    sources : source, or a sequence of them
        As :func:`discover_sources`.
    raw_layout : RawLayout, optional
        Layout of raw binary sources.

    Returns
    -------
    SourcePlan
        The parts, in order, ready to be read in any process.

    Raises
    ------
    SourceError
        When a source is missing, unreadable, or does not continue the first.
    """
    specs = discover_sources(sources, raw_layout)
    parts = [part for spec in specs for part in format_of(spec, raw_layout).inspect(
        spec, raw_layout)]
    return join_parts(parts)


def watch_folder(folder: Path, pattern: str | None = None) -> FolderWatch:
    """A reader of a folder whose files are still being written (``follow``): TIFF files,
    the format microscopes write frame by frame
    (:class:`~deepcad_chunked.sources.growing.FolderWatch`)."""
    return FolderWatch(folder, pattern)
