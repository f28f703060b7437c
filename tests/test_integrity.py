"""Nothing lost, nothing mixed: outputs over inputs, concurrent writers, changing inputs.

Every test drives the real command line in real processes. Where two commands must meet, the
first is started, the test waits for an event of it (its lock, its first finished piece) and
stops its whole process group with SIGSTOP while the second runs, so the meeting happens
every time, without sleeping for a guessed time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import torch
from distributed import Client

from deepcad_chunked import ConvertConfig, convert
from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.store.omezarr import read_group_attrs
from deepcad_chunked.store.recording import open_recording
from tests.conftest import (
    COMMAND,
    assert_clean_error,
    finish,
    lock_holder,
    paused,
    run_cli,
    start_cli,
    stored_chunks,
    wait_until,
)
from tests.tiffs import write_plain


def _model(path: Path, seed: int, features: int = 2) -> Path:
    torch.manual_seed(seed)
    return Checkpoint(model_state=UNet3D(features=features).state_dict(), features=features,
                      normalization={"mean": 100.0, "std": 20.0}).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    """A recording (TIFF and store) long enough for 16 denoise blocks, and two models."""
    w = tmp_path_factory.mktemp("integrity")
    data = np.random.default_rng(3).poisson(100.0, size=(192, 96, 96)).astype(np.uint16)
    (w / "raw").mkdir()
    write_plain(w / "raw" / "rec.tif", data)
    convert(w / "raw" / "rec.tif", w / "rec.zarr", config=ConvertConfig(chunks=(16, 48, 48)),
            cluster=client, progress=False)
    _model(w / "model.pt", seed=0)
    _model(w / "other.pt", seed=1)
    return w


def _denoise(src: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["denoise", str(src), "-m", str(model), "-o", str(out), "--block", "48,48,48",
            "--workers", "1", "--device", "cpu", "--no-progress", *extra]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _markers(store: Path, command: str, pattern: str) -> int:
    folder = store / ".progress" / command
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


@pytest.fixture(scope="module")
def reference(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store an undisturbed denoise with model.pt writes."""
    out = tmp_path_factory.mktemp("reference") / "ref.zarr"
    result = run_cli(*_denoise(world / "rec.zarr", world / "model.pt", out))
    assert result.returncode == 0, result.stderr
    return out


# --------------------------------------------------------------------------- outputs over inputs

OVERLAPS = {
    # id: (command line, words of the error); {w}: the world folder, {o}: a scratch folder
    "denoise-onto-its-input": ("denoise {o}/in.zarr -m {w}/model.pt -o {o}/in.zarr --overwrite",
                               "is the input"),
    "denoise-into-its-input": ("denoise {o}/in.zarr -m {w}/model.pt -o {o}/in.zarr/d.zarr",
                               "lies inside the input"),
    "denoise-onto-a-symlink-of-its-input": (
        "denoise {o}/in.zarr -m {w}/model.pt -o {o}/link.zarr --overwrite", "is the input"),
    "denoise-into-a-symlink-of-its-input": (
        "denoise {o}/in.zarr -m {w}/model.pt -o {o}/link.zarr/d.zarr", "lies inside the input"),
    "denoise-over-its-model": ("denoise {o}/in.zarr -m {o}/m.zarr/model.pt -o {o}/m.zarr "
                               "--overwrite", "contains the input"),
    "convert-into-its-source-folder": ("convert {o}/raw -o {o}/raw/rec.zarr",
                                       "lies inside the input"),
    "convert-onto-its-source": ("convert {o}/raw/rec.tif -o {o}/raw/rec.tif --overwrite",
                                "is the input"),
    "export-into-its-store": ("export {o}/in.zarr -o {o}/in.zarr/x.tif", "lies inside"),
    "export-onto-its-store": ("export {o}/in.zarr -o {o}/in.zarr --overwrite", "is the input"),
    "train-into-its-store": ("train {o}/in.zarr -o {o}/in.zarr/run", "lies inside the input"),
    "run-into-its-source-folder": ("run {o}/raw -o {o}/raw --export", "lies inside the input"),
    "run-onto-its-glob": ("run {o}/raw/*.tif -o {o}/raw --export", "would take the output"),
}


@pytest.mark.parametrize("row", sorted(OVERLAPS))
def test_an_output_over_an_input_is_refused_before_anything_is_touched(
        row: str, world: Path, tmp_path: Path) -> None:
    shutil.copytree(world / "rec.zarr", tmp_path / "in.zarr")
    shutil.copytree(world / "raw", tmp_path / "raw")
    (tmp_path / "link.zarr").symlink_to(tmp_path / "in.zarr")
    (tmp_path / "m.zarr").mkdir()  # a folder holding the model, named like a store
    shutil.copy(world / "model.pt", tmp_path / "m.zarr" / "model.pt")
    before = _digests(tmp_path)
    line, words = OVERLAPS[row]
    result = run_cli(*line.format(w=world, o=tmp_path).split(), "--no-progress")
    assert_clean_error(result, words)
    assert _digests(tmp_path) == before  # not a byte written, nothing deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "link.zarr", "m.zarr",
                                                          "raw"]


def test_run_into_the_folder_of_its_source_file_reruns(world: Path, tmp_path: Path) -> None:
    """``run raw/rec.tif -o raw`` is fine (the products do not overlap the file), and its
    rerun finds nothing of its own among the sources."""
    shutil.copytree(world / "raw", tmp_path / "raw")
    args = ("run", str(tmp_path / "raw" / "rec.tif"), "-o", str(tmp_path / "raw"), "--export",
            "--epochs", "1", "--steps-per-epoch", "2", "--features", "2", "--patch", "8,16,16",
            "--workers", "1", "--no-progress")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "already converted" in again.stderr and "already denoised" in again.stderr
    assert (tmp_path / "raw" / "rec.tif").read_bytes() == (world / "raw" / "rec.tif").read_bytes()


# --------------------------------------------------------------------------- two writers at once

def _pause_when_writing(proc: subprocess.Popen[str], lock: Path, ready: callable) -> None:
    wait_until(lambda: lock_holder(lock) == proc.pid and ready(), proc)


def _denoise_under_way(src: Path, model: Path, out: Path) -> subprocess.Popen[str]:
    """A denoise started and awaited until it holds its lock and has written a block."""
    proc = start_cli(*_denoise(src, model, out))
    _pause_when_writing(proc, out / ".lock", lambda: _markers(out, "denoise", "*.done") >= 1)
    return proc


def test_a_second_denoise_on_one_output_is_refused_naming_the_first(
        world: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    first = _denoise_under_way(world / "rec.zarr", world / "model.pt", out)
    with paused(first):
        for extra in ((), ("--overwrite",)):
            second = run_cli(*_denoise(world / "rec.zarr", world / "other.pt", out, *extra))
            assert_clean_error(second, "is being written by 'denoise'", f"pid {first.pid}",
                               f"on host {socket.gethostname()}", "since")
    err = finish(first)
    assert first.returncode == 0, err
    assert stored_chunks(out) == stored_chunks(reference)  # no block of the other model


def test_two_converts_with_overwrite_on_one_store(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec.zarr"
    args = ["convert", str(world / "raw" / "rec.tif"), "-o", str(out), "--chunks", "2,48,48",
            "--shard", "2,48,48",
            "--workers", "1", "--no-progress", "--overwrite"]
    assert run_cli(*args).returncode == 0
    first = start_cli(*args)
    _pause_when_writing(first, out / ".lock", lambda: _markers(out, "convert", "*.npz") >= 1)
    with paused(first):
        assert_clean_error(run_cli(*args), "is being written by 'convert'", f"pid {first.pid}")
    err = finish(first)
    assert first.returncode == 0, err
    np.testing.assert_array_equal(open_recording(out).array[:],
                                  tifffile.imread(world / "raw" / "rec.tif"))


def test_two_exports_to_one_tiff(world: Path, tmp_path: Path) -> None:
    target = tmp_path / "x.tif"
    lock = tmp_path / ".x.tif.lock"
    for _ in range(10):  # an export is quick: catch one while it writes
        first = start_cli("export", str(world / "rec.zarr"), "-o", str(target), "--overwrite",
                          "--no-progress")
        try:
            wait_until(lambda p=first: lock_holder(lock) == p.pid, first)
        except AssertionError:
            finish(first)
            continue
        with paused(first):
            if lock_holder(lock) != first.pid:
                continue  # finished before it was stopped: try again
            for extra in ((), ("--overwrite",)):
                second = run_cli("export", str(world / "rec.zarr"), "-o", str(target),
                                 "--no-progress", *extra)
                assert_clean_error(second, "is being written by 'export'", f"pid {first.pid}")
        err = finish(first)
        assert first.returncode == 0, err
        break
    else:
        pytest.fail("no export could be caught while it was writing")
    np.testing.assert_array_equal(tifffile.imread(target), open_recording(world /
                                                                          "rec.zarr").array[:])
    assert not list(tmp_path.glob(".x.tif.*"))  # no temporary file and no lock left


def test_a_lock_left_by_a_killed_process_is_taken_over(world: Path, reference: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    first = _denoise_under_way(world / "rec.zarr", world / "model.pt", out)
    os.killpg(first.pid, signal.SIGKILL)
    finish(first)
    assert lock_holder(out / ".lock") == first.pid  # left behind
    result = run_cli(*_denoise(world / "rec.zarr", world / "model.pt", out))
    assert result.returncode == 0, result.stderr
    assert "taking over the lock" in result.stderr and f"pid {first.pid}" in result.stderr
    assert stored_chunks(out) == stored_chunks(reference)
    assert not (out / ".lock").exists()


def _foreign_lock(lock: Path, host: str, pid: int, start: float, age_s: float) -> None:
    lock.write_text(json.dumps({"host": host, "pid": pid, "process_start": start,
                                "since": "2026-01-01T00:00:00+00:00", "command": "denoise",
                                "token": "x"}))
    then = time.time() - age_s
    os.utime(lock, (then, then))


def test_locks_of_other_hosts_by_their_heartbeat(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    out.mkdir()
    _foreign_lock(out / ".lock", "node-elsewhere", 4242, 0.0, age_s=5)
    fresh = run_cli(*_denoise(world / "rec.zarr", world / "model.pt", out))
    assert_clean_error(fresh, "pid 4242 on host node-elsewhere")
    _foreign_lock(out / ".lock", "node-elsewhere", 4242, 0.0, age_s=600)  # no heartbeat since
    stale = run_cli(*_denoise(world / "rec.zarr", world / "model.pt", out))
    assert stale.returncode == 0, stale.stderr
    assert "taking over the lock" in stale.stderr


def test_a_reused_process_id_does_not_keep_a_lock(world: Path, tmp_path: Path) -> None:
    """A lock naming a live process of this host that started at another time (the id was
    reused) is stale."""
    out = tmp_path / "out.zarr"
    out.mkdir()
    _foreign_lock(out / ".lock", socket.gethostname(), os.getpid(),
                  psutil.Process().create_time() - 1000, age_s=0)
    result = run_cli(*_denoise(world / "rec.zarr", world / "model.pt", out))
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- inputs that change

def test_the_model_replaced_while_denoise_runs_is_not_mixed_in(world: Path, reference: Path,
                                                               tmp_path: Path) -> None:
    """A training run rewriting last.pt while it is being used: the job goes on with the
    weights it started with, every block of them."""
    model = tmp_path / "last.pt"
    shutil.copy(world / "model.pt", model)
    out = tmp_path / "out.zarr"
    first = _denoise_under_way(world / "rec.zarr", model, out)
    with paused(first):
        assert _markers(out, "denoise", "*.done") < 16
        tmp = tmp_path / ".last.pt.tmp"
        shutil.copy(world / "other.pt", tmp)
        os.replace(tmp, model)  # as training publishes last.pt
    err = finish(first)
    assert first.returncode == 0, err
    assert "changed while the job ran" in err
    assert stored_chunks(out) == stored_chunks(reference)
    assert open_recording(out).attrs["model"]["digest"] == Checkpoint.load(
        world / "model.pt").digest


def test_the_model_replaced_between_two_runs_of_a_resume(world: Path, tmp_path: Path) -> None:
    model = tmp_path / "last.pt"
    shutil.copy(world / "model.pt", model)
    out = tmp_path / "out.zarr"
    first = _denoise_under_way(world / "rec.zarr", model, out)
    os.killpg(first.pid, signal.SIGKILL)
    finish(first)
    shutil.copy(world / "other.pt", model)
    assert_clean_error(run_cli(*_denoise(world / "rec.zarr", model, out)),
                       "unfinished 'denoise' run with other model", "--overwrite")
    again = run_cli(*_denoise(world / "rec.zarr", model, out, "--overwrite"))
    assert again.returncode == 0, again.stderr
    assert open_recording(out).attrs["model"]["digest"] == Checkpoint.load(
        world / "other.pt").digest


def test_the_input_store_rewritten_while_denoise_runs(world: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.zarr"
    shutil.copytree(world / "rec.zarr", src)
    out = tmp_path / "out.zarr"
    first = _denoise_under_way(src, world / "model.pt", out)
    with paused(first):
        conv = run_cli("convert", str(world / "raw" / "rec.tif"), "-o", str(src), "--chunks",
                       "16,48,48", "--workers", "1", "--overwrite", "--no-progress")
        assert conv.returncode == 0, conv.stderr
    err = finish(first)
    assert first.returncode == 1, err
    assert "was replaced or rewritten while this command ran" in err
    with pytest.raises(DeepCADError, match="incomplete"):
        open_recording(out)


def _convert(src: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", str(src), "-o", str(out), "--chunks", "2,48,48", "--shard", "2,48,48",
            "--workers", "1",
            "--no-progress", *extra]


def _rewrite_keeping_times(path: Path, frames: slice) -> None:
    """Change some frames of ``path`` in place (the same file, the same size, other bytes)
    and give it back its times."""
    before = path.stat()
    data = tifffile.imread(path)
    data[frames] += 1
    tmp = path.with_name("tmp.tif")
    write_plain(tmp, data)
    assert tmp.stat().st_size == before.st_size
    with open(path, "r+b") as fh:
        fh.write(tmp.read_bytes())
    tmp.unlink()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _interrupted_conversion(src: Path, out: Path) -> None:
    first = start_cli(*_convert(src, out))
    _pause_when_writing(first, out / ".lock", lambda: _markers(out, "convert", "*.npz") >= 20)
    os.killpg(first.pid, signal.SIGKILL)
    finish(first)


@pytest.mark.parametrize("frames, words", [
    # the first frames: the file's sampled bytes differ, its identity is another
    (slice(0, 2), ("unfinished 'convert' run with other sources",
                   "(rec.tif changed since (rewritten")),
    # frames already converted, past the sampled bytes: found by comparing them
    (slice(12, 14), ("changed since the unfinished conversion", "frames 12–13 differ")),
], ids=["head", "middle"])
def test_a_source_rewritten_with_its_old_times_does_not_resume_into_a_mix(
        world: Path, tmp_path: Path, frames: slice, words: tuple[str, ...]) -> None:
    src = tmp_path / "rec.tif"
    shutil.copy(world / "raw" / "rec.tif", src)
    out = tmp_path / "out.zarr"
    _interrupted_conversion(src, out)
    _rewrite_keeping_times(src, frames)
    result = run_cli(*_convert(src, out))
    assert_clean_error(result, *words, "--overwrite")
    with pytest.raises(DeepCADError, match="incomplete"):
        open_recording(out)


def test_a_source_only_touched_resumes_after_a_check(world: Path, tmp_path: Path) -> None:
    src = tmp_path / "rec.tif"
    shutil.copy(world / "raw" / "rec.tif", src)
    out = tmp_path / "out.zarr"
    _interrupted_conversion(src, out)
    src.chmod(0o600)  # a metadata change only: its status-change time moves
    result = run_cli(*_convert(src, out))
    assert result.returncode == 0, result.stderr
    assert "checking the" in result.stderr
    np.testing.assert_array_equal(open_recording(out).array[:], tifffile.imread(src))


def test_a_source_rewritten_while_it_is_converted(world: Path, tmp_path: Path) -> None:
    src = tmp_path / "rec.tif"
    shutil.copy(world / "raw" / "rec.tif", src)
    out = tmp_path / "out.zarr"
    first = start_cli(*_convert(src, out))
    _pause_when_writing(first, out / ".lock", lambda: _markers(out, "convert", "*.npz") >= 3)
    with paused(first):
        _rewrite_keeping_times(src, slice(100, 110))
    err = finish(first)
    assert first.returncode == 1, err
    assert "changed while it was being read" in err
    assert read_group_attrs(out)["deepcad_chunked"]["complete"] is False


# --------------------------------------------------------------------------- read-only inputs

@pytest.fixture
def readonly_copy(world: Path, tmp_path: Path) -> Path:
    """The recording store on a read-only filesystem (a tmpfs remounted read-only)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        shutil.copytree(world / "rec.zarr", mnt / "rec.zarr")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt / "rec.zarr"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_inputs_on_a_read_only_filesystem_are_read_without_a_lock(
        world: Path, reference: Path, readonly_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    result = run_cli(*_denoise(readonly_copy, world / "model.pt", out))
    assert result.returncode == 0, result.stderr
    assert stored_chunks(out) == stored_chunks(reference)
    exported = run_cli("export", str(readonly_copy), "-o", str(tmp_path / "x.tif"),
                       "--no-progress")
    assert exported.returncode == 0, exported.stderr
    # and an output there is one line
    assert_clean_error(run_cli(*_denoise(world / "rec.zarr", world / "model.pt",
                                         readonly_copy.parent / "d.zarr")),
                       "cannot write", "read-only")


# --------------------------------------------------------------------------- files and models

def test_every_frame_of_appended_series_is_converted(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 4000, (30, 24, 24), dtype=np.uint16)
    path = tmp_path / "appended.tif"
    tifffile.imwrite(path, data[:10], photometric="minisblack")
    tifffile.imwrite(path, data[10:], append=True, photometric="minisblack")
    result = run_cli("convert", str(path), "-o", str(tmp_path / "a.zarr"), "--workers", "1",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(open_recording(tmp_path / "a.zarr").array[:], data)


def test_series_of_another_size_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tw:
        for frame in np.zeros((5, 24, 24), np.uint16):
            tw.write(frame, metadata=None)
        tw.write(np.zeros((12, 12), np.uint16), metadata=None)
    result = run_cli("convert", str(path), "-o", str(tmp_path / "a.zarr"), "--workers", "1")
    assert_clean_error(result, "2 image series that are not one recording")
    assert not (tmp_path / "a.zarr").exists()


def test_training_that_diverges_stops_in_one_line(world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli("train", str(world / "rec.zarr"), "-o", str(run), "--lr", "0.99",
                     "--features", "8", "--patch", "8,16,16", "--epochs", "3",
                     "--steps-per-epoch", "20", "--workers", "0", "--no-progress")
    assert_clean_error(result, "training diverged in epoch", "lower --lr (it is 0.99)")
    for checkpoint in run.glob("*.pt") if run.exists() else ():
        Checkpoint.load(checkpoint)  # whatever was written has finite weights
    assert not (run / "best.pt").exists() or Checkpoint.load(run / "best.pt")


def test_non_finite_weights_are_refused(world: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint.load(world / "model.pt")
    name = next(iter(ckpt.model_state))
    ckpt.model_state[name] = ckpt.model_state[name].clone()
    ckpt.model_state[name].view(-1)[0] = float("nan")
    ckpt.save(tmp_path / "nan.pt")
    result = run_cli(*_denoise(world / "rec.zarr", tmp_path / "nan.pt", tmp_path / "d.zarr"))
    assert_clean_error(result, "NaN or infinite weights", "diverged")
    assert not (tmp_path / "d.zarr").exists()


def test_non_finite_outputs_are_never_stored_as_a_result(world: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint.load(world / "model.pt")
    bias = [k for k in ckpt.model_state if k.endswith("bias")][-1]  # of the last convolution
    ckpt.model_state[bias] = torch.full_like(ckpt.model_state[bias], 3e38)  # finite weights,
    ckpt.save(tmp_path / "huge.pt")  # outputs beyond float32 once scaled to raw units
    out = tmp_path / "d.zarr"
    result = run_cli(*_denoise(world / "rec.zarr", tmp_path / "huge.pt", out))
    assert_clean_error(result, "NaN or infinite values", "incomplete")
    assert read_group_attrs(out)["deepcad_chunked"]["complete"] is False


# --------------------------------------------------------------------------- small things

def test_too_many_workers_are_capped_with_a_warning(world: Path, tmp_path: Path) -> None:
    result = run_cli("convert", str(world / "raw" / "rec.tif"), "-o", str(tmp_path / "a.zarr"),
                     "--workers", "1000", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "--workers 1000 is more than 2 per CPU core" in result.stderr


def test_a_closed_pipe_is_not_an_error(world: Path) -> None:
    proc = subprocess.Popen([*COMMAND, "info", str(world / "rec.zarr")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before a line is written (``| head -0``)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode == 141, err


def test_an_infinite_frame_rate_is_refused(world: Path, tmp_path: Path) -> None:
    result = run_cli("convert", str(world / "raw" / "rec.tif"), "-o", str(tmp_path / "a.zarr"),
                     "--frame-rate", "inf")
    assert_clean_error(result, "frame_rate")


def test_a_warning_never_comes_with_an_error(world: Path, tmp_path: Path) -> None:
    """A halo below the receptive radius warns — but not when the command then fails."""
    result = run_cli(*_denoise(world / "rec.zarr", world / "model.pt", tmp_path / "d.zarr",
                               "--halo", "8", "--tile-memory", "1KiB"))
    assert_clean_error(result, "memory")
    assert [ln for ln in result.stderr.splitlines() if "halo" in ln and "error" not in ln] == []


def test_every_case_is_documented() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "robustness.md").read_text()
    tests = {n for n in globals() if n.startswith("test_")} - {
        "test_every_case_is_documented",
        "test_an_output_over_an_input_is_refused_before_anything_is_touched"}  # its rows
    names = [*OVERLAPS, *sorted(tests)]
    missing = [n for n in names if f"`{n}" not in text]
    assert not missing, missing
