"""Finding a recording's files: natural order, globs, directories, and what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources.registry import discover_sources, natural_key


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    for p in paths:
        p.write_bytes(b"")
    return paths


def test_natural_order_puts_10_after_9(tmp_path: Path) -> None:
    names = [f"file_{i}.tif" for i in (10, 2, 1, 9, 11)]
    _touch(tmp_path, *names)
    got = [Path(p).name for p in discover_sources(tmp_path)]
    assert got == ["file_1.tif", "file_2.tif", "file_9.tif", "file_10.tif", "file_11.tif"]


def test_natural_key_orders_numbers_by_value() -> None:
    assert natural_key(Path("a_2_b")) < natural_key(Path("a_10_b"))
    assert natural_key(Path("A_1")) < natural_key(Path("a_2"))


def test_glob_and_explicit_files_are_merged_and_deduplicated(tmp_path: Path) -> None:
    a1, _a2, a10, _ = _touch(tmp_path, "a1.tif", "a2.tif", "a10.tif", "b1.tif")
    got = discover_sources([str(a10), str(tmp_path / "a*.tif"), str(a1)])
    assert [Path(p).name for p in got] == ["a1.tif", "a2.tif", "a10.tif"]


def test_directory_lists_only_tiff_files(tmp_path: Path) -> None:
    _touch(tmp_path, "x_1.tif", "x_2.TIFF", "notes.txt", "x_3.btf")
    (tmp_path / "sub").mkdir()
    assert [Path(p).name for p in discover_sources(tmp_path)] == ["x_1.tif", "x_2.TIFF", "x_3.btf"]


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.tif"), "does not exist"),
    (lambda d: str(d / "nothing_*.tif"), "matches no file"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "contains no recording files"),
])
def test_missing_sources_are_named(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        discover_sources(make(tmp_path))
