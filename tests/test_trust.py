"""Nothing read wrong and trusted: damaged stores, linked sources, stale runs.

Every case goes through the real command line in real processes, on real stores and files
made here: a chunk file deleted, cut short or changed, a shape edited in ``zarr.json``, an
HDF5 virtual dataset whose source is missing or changed, a ``run`` rerun after its source
changed. Each must end in one line naming what is wrong, never in zeros read as data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from distributed import Client

from deepcad_chunked import ConvertConfig, convert
from deepcad_chunked.errors import DamagedStoreError, DeepCADError
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.store.omezarr import read_group_attrs
from deepcad_chunked.store.recording import open_recording
from tests.conftest import (
    assert_clean_error,
    finish,
    lock_holder,
    paused,
    run_cli,
    sized_fs,
    start_cli,
    wait_until,
)

FRAMES = 48


def _movie(frames: int = FRAMES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100.0, (frames, 32, 32)).astype(np.uint16)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    """A recording (TIFF and stores: sharded Zarr v3, Zarr v2) and a tiny model."""
    w = tmp_path_factory.mktemp("trust")
    tifffile.imwrite(w / "rec.tif", _movie())
    convert(w / "rec.tif", w / "rec.zarr", config=ConvertConfig(chunks=(8, 32, 32),
                                                                shards=(8, 32, 32)),
            cluster=client, progress=False)
    convert(w / "rec.tif", w / "v2.zarr", config=ConvertConfig(chunks=(8, 32, 32),
                                                               zarr_format=2),
            cluster=client, progress=False)
    torch.manual_seed(0)
    Checkpoint(model_state=UNet3D(features=2).state_dict(), features=2,
               normalization={"mean": 100.0, "std": 10.0}).save(w / "model.pt")
    return w


def _copy(world: Path, tmp_path: Path, name: str = "rec.zarr") -> Path:
    store = tmp_path / name
    shutil.copytree(world / name, store)
    return store


def _delete(store: Path) -> None:
    (store / "0" / "c" / "2" / "0" / "0").unlink()


def _cut(store: Path) -> None:
    chunk = store / "0" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _flip(store: Path) -> None:
    """One byte of compressed data changed: Blosc alone would decode other numbers."""
    chunk = store / "0" / "c" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0xFF
    chunk.write_bytes(bytes(data))


READERS = {
    "denoise": "denoise {s} -m {w}/model.pt -o {o}/d.zarr --workers 1 --block 48,32,32 "
               "--halo 8",
    "export": "export {s} -o {o}/x.tif",
    "export-h5": "export {s} -o {o}/x.h5",
    "train": "train {s} -o {o}/run --features 2 --patch 8,16,16 --epochs 1 "
             "--steps-per-epoch 2 --workers 1",
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("damage, words", [
    (_delete, ("frames 16–23", "missing")),
    (_cut, ("frames 16–23", "do not decode")),
    (_flip, ("frames 16–23", "checksum mismatch")),
], ids=["deleted", "cut-short", "changed"])
def test_a_damaged_chunk_is_refused_by_every_reader(world: Path, tmp_path: Path, reader: str,
                                                     damage: object, words: tuple[str, ...]
                                                     ) -> None:
    store = _copy(world, tmp_path)
    damage(store)  # type: ignore[operator]
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(*READERS[reader].format(s=store, w=world, o=out).split(), "--no-progress",
                     timeout=240)
    assert_clean_error(result, str(store), "is damaged", *words)
    assert result.returncode == 1
    # nothing was made from it: no complete store, no exported file, no checkpoint
    assert not any(p.suffix in (".tif", ".h5") for p in out.iterdir()), list(out.iterdir())
    assert not (out / "run").exists() or not list((out / "run").glob("*.pt"))
    if (out / "d.zarr").exists():
        with pytest.raises(DeepCADError, match="incomplete"):
            open_recording(out / "d.zarr")


def test_a_missing_chunk_of_a_zarr_v2_store_is_refused(world: Path, tmp_path: Path) -> None:
    store = _copy(world, tmp_path, "v2.zarr")
    (store / "0" / "3" / "0" / "0").unlink()
    result = run_cli("export", str(store), "-o", str(tmp_path / "x.tif"), "--no-progress")
    assert_clean_error(result, "frames 24–31", "missing")


def test_a_shape_edited_in_the_metadata_is_refused(world: Path, tmp_path: Path) -> None:
    for frames in (0, FRAMES + 8):
        store = _copy(world, tmp_path, "rec.zarr")
        meta = json.loads((store / "0" / "zarr.json").read_text())
        meta["shape"][0] = frames
        (store / "0" / "zarr.json").write_text(json.dumps(meta))
        result = run_cli("export", str(store), "-o", str(tmp_path / "x.tif"), "--no-progress")
        assert_clean_error(result, f"says shape ({frames}, 32, 32)",
                           f"written with shape ({FRAMES}, 32, 32)")
        shutil.rmtree(store)
    assert not (tmp_path / "x.tif").exists()


def test_info_verify_lists_every_damaged_chunk(world: Path, tmp_path: Path) -> None:
    good = run_cli("info", "--verify", str(world / "rec.zarr"))
    assert good.returncode == 0, good.stderr
    assert "every chunk is there and decodes" in good.stdout
    store = _copy(world, tmp_path)
    _delete(store)
    chunk = store / "0" / "c" / "4" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[30] ^= 0x01
    chunk.write_bytes(bytes(data))
    bad = run_cli("info", "--verify", str(store), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["checksums"] is True
    assert [d["frames"] for d in report["damaged"]] == ["16–23", "32–39"]
    assert "missing" in report["damaged"][0]["why"]
    assert "checksum" in report["damaged"][1]["why"]


def test_every_chunk_we_write_carries_a_checksum(world: Path) -> None:
    meta = json.loads((world / "rec.zarr" / "0" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes", "blosc", "crc32c"]
    assert read_group_attrs(world / "rec.zarr")["deepcad_chunked"]["shape"] == [FRAMES, 32, 32]


def test_a_damaged_store_raises_the_error_in_python_too(world: Path, tmp_path: Path) -> None:
    store = _copy(world, tmp_path)
    _flip(store)
    rec = open_recording(store)
    np.testing.assert_array_equal(rec.array[:16], _movie()[:16])  # intact frames still read
    with pytest.raises(DamagedStoreError, match="frames 16–23"):
        rec.array[10:30]
    with pytest.raises(DamagedStoreError, match="frames 16–23"):
        rec.to_dask().compute(scheduler="threads")


# --------------------------------------------------------------------------- linked sources

def _virtual(folder: Path, frames: int = FRAMES, parts: int = 2) -> np.ndarray:
    """``vds.h5:/data``: a virtual dataset over ``src_0.h5`` … (frames split evenly)."""
    data = _movie(frames, seed=1)
    step = frames // parts
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    for i in range(parts):
        with h5py.File(folder / f"src_{i}.h5", "w") as f:
            f["d"] = data[i * step:(i + 1) * step]
        layout[i * step:(i + 1) * step] = h5py.VirtualSource(
            f"src_{i}.h5", "d", shape=(step, *data.shape[1:]))
    with h5py.File(folder / "vds.h5", "w") as f:
        f.create_virtual_dataset("data", layout, fillvalue=0)
    return data


def test_a_virtual_dataset_with_a_missing_source_is_refused(tmp_path: Path) -> None:
    _virtual(tmp_path)
    (tmp_path / "src_1.h5").unlink()
    result = run_cli("convert", str(tmp_path / "vds.h5"), "-o", str(tmp_path / "v.zarr"),
                     "--workers", "1", "--no-progress")
    assert_clean_error(result, "virtual dataset", "src_1.h5", "does not exist")
    assert not (tmp_path / "v.zarr").exists()


def test_linked_files_are_read_and_listed(tmp_path: Path) -> None:
    data = _virtual(tmp_path)
    with h5py.File(tmp_path / "link.h5", "w") as f:
        f["movie"] = h5py.ExternalLink("vds.h5", "data")
    info = run_cli("info", str(tmp_path / "link.h5"), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["files"] == [
        str(tmp_path / n) for n in ("link.h5", "vds.h5", "src_0.h5", "src_1.h5")]
    result = run_cli("convert", str(tmp_path / "link.h5"), "-o", str(tmp_path / "l.zarr"),
                     "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(open_recording(tmp_path / "l.zarr").array[:], data)


def test_a_source_of_a_virtual_dataset_changed_between_a_kill_and_the_rerun(
        tmp_path: Path) -> None:
    _virtual(tmp_path, frames=400, parts=4)
    out = tmp_path / "v.zarr"
    args = ["convert", str(tmp_path / "vds.h5"), "-o", str(out), "--workers", "1",
            "--chunks", "4,32,32", "--shard", "4,32,32", "--no-progress"]
    first = start_cli(*args)
    markers = out / ".progress" / "convert"
    wait_until(lambda: lock_holder(out / ".lock") == first.pid and markers.is_dir()
               and len(list(markers.glob("*.npz"))) >= 3, first)
    with paused(first):
        os.killpg(first.pid, signal.SIGKILL)
    finish(first)
    with h5py.File(tmp_path / "src_3.h5", "r+") as f:  # other frames, same file size
        f["d"][0] = f["d"][0] + 1
    result = run_cli(*args)
    assert_clean_error(result, "unfinished 'convert' run with other sources",
                       "src_3.h5 (read through vds.h5) changed since", "--overwrite")
    with pytest.raises(DeepCADError, match="incomplete"):
        open_recording(out)


def test_a_source_of_a_virtual_dataset_changed_while_it_is_read(tmp_path: Path) -> None:
    """Found by the check around every read, as for the file itself."""
    from deepcad_chunked.sources.registry import open_sources

    _virtual(tmp_path)
    plan = open_sources([str(tmp_path / "vds.h5")])
    assert plan.files[1:] == [str(tmp_path / "src_0.h5"), str(tmp_path / "src_1.h5")]
    with h5py.File(tmp_path / "src_1.h5", "r+") as f:
        f["d"][0] = 0
    with pytest.raises(DeepCADError, match=r"src_1\.h5 \(read through .*vds\.h5\) changed while"):
        plan.read(0, FRAMES)


# --------------------------------------------------------------------------- stale runs

@pytest.mark.parametrize("change, words", [
    ("rewritten", "rewritten: same size"),
    ("appended", "bytes)"),
])
def test_run_rerun_after_its_source_changed_is_refused(tmp_path: Path, change: str,
                                                       words: str) -> None:
    src = tmp_path / "rec.tif"
    data = _movie()
    tifffile.imwrite(src, data)
    args = ["run", str(src), "-o", str(tmp_path / "out"), "--workers", "1", "--features", "2",
            "--patch", "8,16,16", "--epochs", "1", "--steps-per-epoch", "2", "--no-progress"]
    first = run_cli(*args, timeout=400)
    assert first.returncode == 0, first.stderr
    again = run_cli(*args, timeout=400)
    assert again.returncode == 0 and "already converted" in again.stderr, again.stderr
    if change == "rewritten":
        tifffile.imwrite(src, data + 1)
    else:
        tifffile.imwrite(src, np.concatenate([data, data[:32]]))
    stale = run_cli(*args, timeout=400)
    assert_clean_error(stale, "recording.zarr no longer matches its sources", "rec.tif", words,
                       "--overwrite to convert, train and denoise again")
    assert open_recording(tmp_path / "out" / "recording.zarr").shape[0] == FRAMES


# --------------------------------------------------------------------------- full disks

EXPORTS = {"tiff": "x.tif", "hdf5": "x.h5", "nwb": "x.nwb", "suite2p": "s2p"}


@pytest.fixture(scope="module")
def long_store(world: Path, tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    """96 frames of 64×64 in 12 chunk rows: an export of several slabs."""
    folder = tmp_path_factory.mktemp("long")
    data = np.random.default_rng(2).integers(0, 30000, (96, 64, 64), dtype=np.uint16)
    tifffile.imwrite(folder / "long.tif", data)
    convert(folder / "long.tif", folder / "long.zarr",
            config=ConvertConfig(chunks=(8, 64, 64), shards=(8, 64, 64), frame_rate=30.0),
            cluster=client, progress=False)
    return folder / "long.zarr"


def _export(store: Path, out: Path, fmt: str) -> list[str]:
    return ["export", str(store), "-o", str(out / EXPORTS[fmt]), "--format", fmt,
            "--no-progress"]


@pytest.mark.parametrize("fmt", sorted(EXPORTS))
def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(
        long_store: Path, small_fs: Path, fmt: str) -> None:
    result = run_cli(*_export(long_store, small_fs, fmt))
    assert_clean_error(result, "no space left on", "make room")
    assert result.returncode == 1
    assert os.listdir(small_fs) == []  # no temporary file, no lock, no empty folder


@pytest.fixture
def roomy_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs: room for an export of ``long_store`` until something else fills it."""
    with sized_fs(tmp_path / "fs", "6m") as mnt:
        yield mnt


@pytest.mark.parametrize("fmt", ["hdf5", "nwb", "tiff"])
def test_a_disk_that_fills_during_an_export_never_crashes_it(
        long_store: Path, roomy_fs: Path, fmt: str) -> None:
    """The disk fills while the export runs (another program writes a big file): the export
    ends in its one line, exit 1 — never a segmentation fault of HDF5 — and removes its
    temporary file and its lock."""
    proc = start_cli(*_export(long_store, roomy_fs, fmt))
    partial = lambda: [p for p in roomy_fs.iterdir() if p.name.endswith(".partial")]  # noqa: E731
    wait_until(lambda: any(p.stat().st_size > 0 for p in partial()), proc)
    with paused(proc):
        filler = roomy_fs / "filler"
        with open(filler, "wb") as fh:  # the rest of the disk, but for a few KiB
            while True:
                try:
                    fh.write(b"\0" * 65536)
                    fh.flush()
                except OSError:
                    break
        os.truncate(filler, filler.stat().st_size - 16384)
    err = finish(proc)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "no space left on" in err, err
    assert sorted(os.listdir(roomy_fs)) == ["filler"]
