"""A conversion killed with SIGKILL resumes without redoing work and ends byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deepcad_chunked.errors import IncompleteStoreError
from deepcad_chunked.store.recording import open_recording
from tests.conftest import assert_clean_error, run_cli
from tests.tiffs import write_plain

FRAMES, CHUNK_T, SHARD_T = 1200, 2, 4
SLABS = FRAMES // SHARD_T  # 300 slabs of one shard of two chunks: long enough to be killed


def _chunk_files(store: Path) -> dict[str, tuple[bytes, int]]:
    root = store / "0"
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("zarr.json",)}


def _convert_args(src: Path | str, out: Path) -> list[str]:
    return ["convert", str(src), "-o", str(out), "--chunks", f"{CHUNK_T},48,48", "--shard",
            f"{SHARD_T},48,48", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    data = rng.poisson(40.0, size=(FRAMES, 48, 48)).astype(np.uint16)
    return write_plain(tmp_path_factory.mktemp("resume") / "rec.tif", data)


@pytest.fixture(scope="module")
def hdf5_recording(tmp_path_factory: pytest.TempPathFactory, recording: Path) -> Path:
    """The same frames in a gzip-compressed HDF5 dataset among others."""
    h5py = pytest.importorskip("h5py")
    import tifffile

    path = tmp_path_factory.mktemp("resume_h5") / "rec.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imaging/mov", data=tifffile.imread(recording), chunks=(16, 48, 48),
                         compression="gzip")
        f["imaging/reference"] = np.zeros((2, 48, 48), dtype=np.uint16)
    return path


def _kill_midway(args: list[str], progress: Path, at_least: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "deepcad_chunked.cli.main", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            done = len(list(progress.glob("*.npz"))) if progress.is_dir() else 0
            if done >= at_least:
                break
            if proc.poll() is not None:
                pytest.fail("the conversion finished before it could be killed")
            time.sleep(0.02)
        else:
            pytest.fail("the conversion made no progress")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver, scheduler and workers: all at once
        proc.wait()


@pytest.mark.parametrize("kind", ["tiff", "hdf5"])
def test_sigkill_then_rerun_resumes_and_matches(tmp_path: Path, request: pytest.FixtureRequest,
                                                kind: str) -> None:
    recording = (request.getfixturevalue("recording") if kind == "tiff"
                 else f"{request.getfixturevalue('hdf5_recording')}:/imaging/mov")
    reference = tmp_path / "reference.zarr"
    assert run_cli(*_convert_args(recording, reference)).returncode == 0
    want = _chunk_files(reference)

    out = tmp_path / "killed.zarr"
    progress = out / ".progress" / "convert"
    _kill_midway(_convert_args(recording, out), progress, at_least=SLABS // 4)
    with pytest.raises(IncompleteStoreError):
        open_recording(out)
    info = run_cli("info", str(out), "--json")
    assert info.returncode == 0 and '"complete": false' in info.stdout
    assert_clean_error(run_cli("export", str(out), "-o", str(tmp_path / "x.tif")), "incomplete")

    finished = {int(p.stem) for p in progress.glob("*.npz")}
    assert 0 < len(finished) < SLABS
    before = _chunk_files(out)
    time.sleep(0.05)

    result = run_cli(*_convert_args(recording, out))
    assert result.returncode == 0, result.stderr
    todo = SLABS - len(finished)
    assert f"{todo} of {SLABS} slabs to do" in result.stderr

    after = _chunk_files(out)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in want.items()}
    untouched = [k for k in before if int(k.split("/")[1]) in finished]
    assert untouched and all(after[k][1] == before[k][1] for k in untouched), \
        "shards of finished slabs were written again"
    assert not (out / ".progress").exists()
    assert open_recording(out).statistics == open_recording(reference).statistics


def test_rerun_with_other_options_does_not_touch_the_unfinished_store(tmp_path: Path,
                                                                      recording: Path) -> None:
    out = tmp_path / "killed.zarr"
    progress = out / ".progress" / "convert"
    _kill_midway(_convert_args(recording, out), progress, at_least=20)
    before = _chunk_files(out)
    args = _convert_args(recording, out)
    args[args.index("--chunks") + 1] = "4,48,48"
    assert_clean_error(run_cli(*args), "unfinished 'convert' run", "--overwrite")
    assert _chunk_files(out) == before
    result = run_cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert open_recording(out).chunks == (4, 48, 48)
