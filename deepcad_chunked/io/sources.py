"""Finding the files that make up one recording."""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from deepcad_chunked.errors import SourceError
from deepcad_chunked.io.omezarr import is_zarr_store

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
_DIGITS = re.compile(r"(\d+)")
GLOB_CHARS = re.compile(r"[*?\[]")


def natural_key(path: Path) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``file_2`` before ``file_10``.

    Parameters
    ----------
    path : Path
        The path to order; its full text (folders included) is compared.

    Returns
    -------
    tuple
        Alternating text and number parts, comparable between any two paths.
    """
    parts = _DIGITS.split(str(path))
    return tuple((1, int(p)) if p.isdigit() else (0, p.lower()) for p in parts if p)


def _is_tiff_name(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def discover_sources(sources: Sequence[str | Path] | str | Path) -> list[Path]:
    """Expand files, glob patterns and directories into one naturally sorted list.

    Parameters
    ----------
    sources : path, glob pattern, directory, or a sequence of them
        A directory contributes its TIFF files (not recursively); a pattern its matches.

    Returns
    -------
    list of Path
        Resolved, de-duplicated paths in natural sort order (``file_1, file_2, …, file_10``).

    Raises
    ------
    SourceError
        When a path does not exist, a pattern or directory matches no TIFF file, or nothing
        is given.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: list[Path] = []
    for item in sources:
        found.extend(_expand_one(str(item)))
    if not found:
        raise SourceError("no source files given")
    unique = {p.resolve(): p for p in found}
    return sorted(unique, key=natural_key)


def _expand_one(item: str) -> Iterable[Path]:
    path = Path(item).expanduser()
    if path.is_dir():
        if is_zarr_store(path):
            raise SourceError(f"{path} is a Zarr store, not TIFF files: train, denoise and "
                              "export read it as it is (see: deepcad-chunked info "
                              f"{path})")
        files = [p for p in path.iterdir() if p.is_file() and _is_tiff_name(p)]
        if not files:
            raise SourceError(f"directory {path} contains no TIFF files (*.tif, *.tiff)")
        return files
    if path.exists():
        if not path.is_file():
            raise SourceError(f"{path} is not a regular file")
        return [path]
    if GLOB_CHARS.search(item):
        matches = [Path(m) for m in glob.glob(str(path)) if Path(m).is_file()]
        if not matches:
            raise SourceError(f"pattern {item!r} matches no file")
        return matches
    raise SourceError(f"source {path} does not exist")
