"""Bad input, end to end: every row of docs/robustness.md, through the real command line.

Each row: one clear line on standard error, a non-zero exit code, no traceback, the inputs
untouched (every file's bytes compared), and nothing complete-looking written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr
from distributed import Client

from deepcad_chunked import ConvertConfig, convert
from deepcad_chunked.errors import DeepCADError, IncompleteStoreError
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.store.omezarr import ATTRS_KEY, read_group_attrs, update_attrs
from deepcad_chunked.store.recording import open_recording
from tests.conftest import assert_clean_error, run_cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"


class _Payload:
    """Unpickling this would create a file: the test that the code never runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def _movie(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100.0, size=shape).astype(np.uint16)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    """Every bad (and one good) input of the table, made once."""
    w = tmp_path_factory.mktemp("world")
    good = _movie((48, 32, 32))
    tifffile.imwrite(w / "good.tif", good)
    convert(w / "good.tif", w / "good.zarr", config=ConvertConfig(chunks=(16, 32, 32)),
            cluster=client, progress=False)
    torch.manual_seed(0)
    Checkpoint(model_state=UNet3D(features=2).state_dict(), features=2,
               normalization={"mean": 100.0, "std": 10.0}).save(w / "model.pt")
    (w / "fake.tif").write_text("a text file renamed .tif\n" * 20)
    data = (w / "good.tif").read_bytes()
    (w / "truncated.tif").write_bytes(data[: len(data) // 2])
    (w / "empty.tif").write_bytes(b"")
    tifffile.imwrite(w / "one.tif", good[:1])
    tifffile.imwrite(w / "image2d.tif", good[0])
    (w / "series").mkdir()
    tifffile.imwrite(w / "series" / "part_1.tif", good[:10])
    tifffile.imwrite(w / "series" / "part_2.tif", good[:10, :16])
    nan = good.astype(np.float32)
    nan[3, 4, 5], nan[7, 1, 1] = np.nan, np.inf
    tifffile.imwrite(w / "nan.tif", nan)
    convert(w / "nan.tif", w / "nan.zarr", cluster=client, progress=False)
    (w / "emptydir.zarr").mkdir()
    (w / "foreign.zarr").mkdir()
    (w / "foreign.zarr" / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    shutil.copytree(w / "good.zarr", w / "incomplete.zarr")
    update_attrs(w / "incomplete.zarr", complete=False)
    shutil.copytree(w / "good.zarr", w / "existing.zarr")
    other = Checkpoint.load(w / "model.pt")
    other.features = 4  # weights of a 2-feature network declared as another network
    other.save(w / "other.pt")
    model = (w / "model.pt").read_bytes()
    (w / "truncated.pt").write_bytes(model[: len(model) // 2])
    torch.save({"format": "x", "payload": _Payload(str(w / "pwned"))}, w / "evil.pt")
    (w / "evil.pkl").write_bytes(pickle.dumps(_Payload(str(w / "pwned"))))
    tifffile.imwrite(w / "complex.tif", good.astype(np.complex64))
    zarr.create_array(w / "bool.zarr", shape=(8, 16, 16), dtype=bool, fill_value=False,
                      dimension_names=["t", "y", "x"])[:] = good[:8, :16, :16] > 100
    good[:8].tofile(w / "rec.raw")
    tifffile.imwrite(w / "const.tif", np.full((8, 16, 16), 7, np.uint16))
    with h5py.File(w / "damaged.h5", "w") as f:
        dataset = f.create_dataset("data", data=good, chunks=(8, 32, 32), fletcher32=True)
        offset = dataset.id.get_chunk_info(1).byte_offset
    damaged = bytearray((w / "damaged.h5").read_bytes())
    damaged[offset + 100] ^= 0xFF
    (w / "damaged.h5").write_bytes(bytes(damaged))
    return w


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (outside out/) with a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "out" not in p.parts}


def _nothing_complete(out: Path) -> None:
    """No store in ``out`` is complete, and no model, TIFF or ONNX file was written there."""
    if not out.exists():
        return
    for entry in out.iterdir():
        if entry.suffix == ".zarr":
            with pytest.raises(DeepCADError):  # incomplete, or not a store at all
                open_recording(entry)
        else:
            assert entry.suffix not in (".pt", ".tif", ".onnx"), entry
            if entry.is_dir():  # a training run directory: no checkpoint
                assert not list(entry.glob("*.pt")), entry


#: id → (command line with {w} the inputs and {o} the output folder, words of the error)
ROWS: dict[str, tuple[str, str]] = {
    "missing-tiff": ("convert {w}/missing.tif -o {o}/a.zarr", "does not exist"),
    "missing-store": ("denoise {w}/missing.zarr -m {w}/model.pt -o {o}/a.zarr",
                      "does not exist"),
    "missing-model": ("denoise {w}/good.zarr -m {w}/missing.pt -o {o}/a.zarr",
                      "does not exist"),
    "not-a-tiff": ("convert {w}/fake.tif -o {o}/a.zarr", "not a readable TIFF"),
    "truncated-tiff": ("convert {w}/truncated.tif -o {o}/a.zarr", "truncated"),
    "zero-frames": ("convert {w}/empty.tif -o {o}/a.zarr", "not a readable TIFF"),
    "single-frame": ("convert {w}/one.tif -o {o}/a.zarr", "single frame"),
    "2d-image": ("convert {w}/image2d.tif -o {o}/a.zarr", "single frame"),
    "mixed-shapes": ("convert {w}/series -o {o}/a.zarr", "must match"),
    "nan-train": ("train {w}/nan.zarr -o {o}/run", "NaN or infinite"),
    "nan-denoise": ("denoise {w}/nan.zarr -m {w}/model.pt -o {o}/a.zarr", "NaN or infinite"),
    "empty-store": ("train {w}/emptydir.zarr -o {o}/run", "not a Zarr store"),
    "foreign-store": ("denoise {w}/foreign.zarr -m {w}/model.pt -o {o}/a.zarr",
                      "neither a deepcad-chunked recording nor an OME-Zarr image"),
    "incomplete-store": ("train {w}/incomplete.zarr -o {o}/run", "incomplete"),
    "incomplete-denoise": ("denoise {w}/incomplete.zarr -m {w}/model.pt -o {o}/a.zarr",
                           "incomplete"),
    "existing-output": ("convert {w}/good.tif -o {w}/existing.zarr", "already exists"),
    "other-architecture": ("denoise {w}/good.zarr -m {w}/other.pt -o {o}/a.zarr",
                           "do not fit"),
    "truncated-model": ("denoise {w}/good.zarr -m {w}/truncated.pt -o {o}/a.zarr",
                        "truncated"),
    "pickle-code": ("denoise {w}/good.zarr -m {w}/evil.pt -o {o}/a.zarr", "refused"),
    "plain-pickle": ("denoise {w}/good.zarr -m {w}/evil.pkl -o {o}/a.zarr",
                     "not a readable model"),
    "negative-size": ("convert {w}/good.tif -o {o}/a.zarr --chunks=-16,32,32", "chunks"),
    "block-below-halo": ("denoise {w}/good.zarr -m {w}/model.pt -o {o}/a.zarr "
                         "--block 16,32,32", "smaller than the halo"),
    "block-off-grid": ("denoise {w}/good.zarr -m {w}/model.pt -o {o}/a.zarr "
                       "--block 48,44,48", "multiples of 8"),
    "unknown-cluster": ("convert {w}/good.tif -o {o}/a.zarr --cluster moon", "unknown cluster"),
    "zero-workers": ("convert {w}/good.tif -o {o}/a.zarr --workers 0", "at least 1"),
    "zero-epochs": ("train {w}/good.zarr -o {o}/run --epochs 0", "epochs"),
    "bad-patch": ("train {w}/good.zarr -o {o}/run --patch 12,16,16", "patch"),
    "complex-samples": ("convert {w}/complex.tif -o {o}/a.zarr", "complex samples"),
    "bool-samples": ("export {w}/bool.zarr -o {o}/x.nwb --frame-rate 30", "boolean"),
    "raw-offset-past-the-end": ("convert {w}/rec.raw -o {o}/a.zarr --raw-shape auto,32,32 "
                                "--raw-offset 99999999", "no more than its header"),
    "model-folder": ("denoise {w}/good.zarr -m {w} -o {o}/a.zarr", "is a folder, not a model"),
    "output-under-a-file": ("convert {w}/good.tif -o {w}/one.tif/a.zarr",
                            "one.tif is a file, not a folder"),
    "damaged-hdf5-chunk": ("convert {w}/damaged.h5 -o {o}/a.zarr", "is damaged"),
    "no-offset-for-the-snr": ("evaluate {w}/good.tif --truth {w}/good.tif", "detector offset"),
    "constant-truth": ("evaluate {w}/const.tif --truth {w}/const.tif --offset 0",
                       "is constant"),
    "constant-raw": ("evaluate {w}/const.tif --raw {w}/const.tif",
                     "does not change from frame to frame"),
    "run-to-a-url": ("run {w}/good.tif -o s3://bucket/out", "must be a local folder"),
    "follow-to-a-url": ("follow {w} -m {w}/model.pt -o s3://bucket/out",
                        "must be a local folder"),
    "bad-remote-limit": ("info {w}/good.zarr --json", "DEEPCAD_CHUNKED_ATTEMPTS"),
}

#: Rows whose command runs with extra environment variables.
ENVIRONMENT = {"bad-remote-limit": {"DEEPCAD_CHUNKED_ATTEMPTS": "none"}}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input_gives_one_line_and_changes_nothing(row: str, world: Path,
                                                      tmp_path: Path) -> None:
    line, words = ROWS[row]
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(world)
    result = run_cli(*line.format(w=world, o=out).split(), timeout=180,
                     env=ENVIRONMENT.get(row, {}))
    assert_clean_error(result, words)
    assert result.returncode == 1
    assert _snapshot(world) == before, "an input was changed"
    _nothing_complete(out)
    assert not (world / "pwned").exists()  # no pickled code ran


def test_every_row_is_documented() -> None:
    text = DOCS.read_text()
    rows = set(ROWS) | {"read-only-output", "full-output", "full-training-disk",
                        "nan-convert", "debug"}
    missing = [row for row in rows if f"`{row}`" not in text]
    assert not missing, missing


def test_python_m_runs_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "deepcad_chunked", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("deepcad-chunked "), result


def test_info_reads_a_raw_file_with_its_layout(world: Path) -> None:
    asked = run_cli("info", str(world / "rec.raw"))
    assert_clean_error(asked, "--raw-shape")
    described = run_cli("info", str(world / "rec.raw"), "--raw-shape", "auto,32,32", "--json")
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["shape"] == [8, 32, 32]


def test_a_denoised_store_can_be_trained_on(world: Path, tmp_path: Path) -> None:
    """A denoised store has no statistics of its own: they are computed once, as for a store
    written by another tool, and kept beside it."""
    dn = tmp_path / "dn.zarr"
    made = run_cli("denoise", str(world / "good.zarr"), "-m", str(world / "model.pt"), "-o",
                   str(dn), "--workers", "1", "--no-progress")
    assert made.returncode == 0, made.stderr
    trained = run_cli("train", str(dn), "-o", str(tmp_path / "run"), "--features", "2",
                      "--patch", "8,16,16", "--epochs", "1", "--steps-per-epoch", "2",
                      "--workers", "0", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    assert "computing the statistics" in trained.stderr
    assert (tmp_path / "dn.zarr.deepcad-chunked.json").is_file()


def test_debug_shows_the_traceback(world: Path) -> None:
    result = run_cli("--debug", "convert", str(world / "fake.tif"), "-o", "/nonexistent/a.zarr")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_nan_convert_is_lossless_and_warns(world: Path, tmp_path: Path) -> None:
    rec = open_recording(world / "nan.zarr")
    assert rec.complete and rec.statistics["nonfinite"] == 2
    stored = rec.array[:]
    assert np.isnan(stored[3, 4, 5]) and np.isinf(stored[7, 1, 1])
    result = run_cli("convert", str(world / "nan.tif"), "-o", str(tmp_path / "n.zarr"),
                     "--workers", "1")
    assert result.returncode == 0 and "2 samples are NaN or infinite" in result.stderr


def test_read_only_output(world: Path, readonly_dir: Path) -> None:
    before = _snapshot(world)
    result = run_cli("convert", str(world / "good.tif"), "-o", str(readonly_dir / "a.zarr"),
                     "--workers", "1")
    assert_clean_error(result, "cannot write")
    assert _snapshot(world) == before
    assert not (readonly_dir / "a.zarr").exists()


def test_full_output_is_left_incomplete_and_resumes(world: Path, small_fs: Path,
                                                    tmp_path: Path) -> None:
    big = tmp_path / "big.tif"
    tifffile.imwrite(big, np.random.default_rng(0).integers(0, 60000, (100, 64, 64),
                                                            dtype=np.uint16))
    out = small_fs / "a.zarr"
    result = run_cli("convert", str(big), "-o", str(out), "--workers", "2")
    assert_clean_error(result, "no space left", "rerun")
    assert read_group_attrs(out)[ATTRS_KEY]["complete"] is False
    with pytest.raises(IncompleteStoreError):
        open_recording(out)
    # with room made (the same store moved to a big filesystem), the rerun finishes it
    moved = tmp_path / "a.zarr"
    shutil.copytree(out, moved)
    result = run_cli("convert", str(big), "-o", str(moved), "--workers", "1")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(open_recording(moved).array[:], tifffile.imread(big))
    assert os.listdir(small_fs)  # the full filesystem kept its partial store


def test_full_disk_during_training(world: Path, small_fs: Path) -> None:
    run = small_fs / "run"
    result = run_cli("train", str(world / "good.zarr"), "-o", str(run), "--features", "4",
                     "--patch", "8,16,16", "--epochs", "2", "--steps-per-epoch", "2",
                     "--batch-size", "2", "--workers", "0", "--no-progress")
    assert_clean_error(result, "cannot write", "no space left")
    assert not list(run.glob("*.pt")) and not list(run.glob(".*.tmp"))  # no half checkpoint
