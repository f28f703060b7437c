"""Store-to-store denoising on a real LocalCluster: exact, resumable, survives a dead worker."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

from deepcad_chunked import ConvertConfig, DenoiseConfig, convert, denoise, predict_array
from deepcad_chunked.cluster import INFERENCE_RESOURCES
from deepcad_chunked.config import INFERENCE_THREADS, CompressionConfig
from deepcad_chunked.jobs.denoise import Layout, _Job
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.store.omezarr import create_image, update_attrs
from deepcad_chunked.store.recording import open_recording
from tests.conftest import assert_clean_error, run_cli, stored_chunks
from tests.tiffs import write_imagej, write_plain


@pytest.fixture(scope="module")
def model_path(tiny_model: Path) -> Path:
    return tiny_model


def _store(folder: Path, raw: np.ndarray, client: Client, name: str = "rec") -> Path:
    tif = write_plain(folder / f"{name}.tif", raw)
    convert(tif, folder / f"{name}.zarr", config=ConvertConfig(chunks=(16, 16, 16)),
            cluster=client, progress=False)
    return folder / f"{name}.zarr"


def _poisson(shape: tuple[int, ...], dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100.0, size=shape).astype(dtype)


@pytest.mark.parametrize("shape, block", [((37, 45, 53), (48, 48, 48)),
                                          ((70, 50, 40), (56, 48, 64))])  # off the chunk grid
def test_store_to_store_equals_monolithic(tmp_path: Path, client: Client, model_path: Path,
                                          shape, block) -> None:
    raw = _poisson(shape)
    out = denoise(_store(tmp_path, raw, client), model_path, tmp_path / "out.zarr",
                  config=DenoiseConfig(block=block, dtype="float32"), cluster=client,
                  progress=False)
    want = predict_array(load_model(model_path), raw)
    assert out.dtype == np.float32 and out.shape == raw.shape and out.chunks == (16, 16, 16)
    assert np.abs(out.array[:] - want).max() <= 1e-4 * float(raw.max() - raw.min())
    assert out.attrs["kind"] == "denoised" and out.complete
    assert out.attrs["model"]["digest"] == Checkpoint.load(model_path).digest
    assert out.attrs["parameters"]["halo"] == 48


def test_default_blocks_tiled_to_a_small_memory_equal_monolithic(tmp_path: Path,
                                                                 client: Client,
                                                                 model_path: Path) -> None:
    raw = _poisson((100, 60, 50), seed=4)
    store = _store(tmp_path, raw, client)
    out = tmp_path / "o.zarr"
    result = run_cli("denoise", str(store), "-m", str(model_path), "-o", str(out),
                     "--dtype", "float32", "--tile-memory", "200MB", "--workers", "2",
                     "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "tiles inside its task" in result.stderr
    got = open_recording(out).array[:]
    want = predict_array(load_model(model_path), raw)
    assert np.abs(got - want).max() <= 1e-4 * float(raw.max() - raw.min())


def test_a_small_halo_is_inexact_and_says_so(tmp_path: Path, client: Client,
                                            model_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    raw = _poisson((96, 64, 64), seed=5)
    with caplog.at_level(logging.WARNING, logger="deepcad_chunked"):
        out = denoise(_store(tmp_path, raw, client), model_path, tmp_path / "o.zarr",
                      config=DenoiseConfig(block=(48, 48, 48), halo=0, dtype="float32"),
                      cluster=client, progress=False)
    assert "no longer exact" in caplog.text
    error = np.abs(out.array[:] - predict_array(load_model(model_path), raw)).max()
    assert error > 1e-4 * float(raw.max() - raw.min())


def test_same_dtype_is_rounded_and_clipped(tmp_path: Path, client: Client,
                                           model_path: Path) -> None:
    raw = _poisson((40, 24, 24), "int16")
    raw[:5] = -30000  # far below what the network will output: clipping shows
    out = denoise(_store(tmp_path, raw, client), model_path, tmp_path / "o.zarr",
                  config=DenoiseConfig(block=(48, 48, 48)), cluster=client, progress=False)
    want = np.clip(np.round(predict_array(load_model(model_path), raw)), -32768, 32767)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out.array[:], want.astype(np.int16))


def test_planes_and_channels_are_separate_series(tmp_path: Path, client: Client,
                                                 model_path: Path) -> None:
    raw = _poisson((24, 2, 2, 20, 20))  # ImageJ TZCYX
    tif = write_imagej(tmp_path / "h.tif", raw)
    rec = convert(tif, tmp_path / "h.zarr", cluster=client, progress=False)
    out = denoise(rec.path, model_path, tmp_path / "o.zarr",
                  config=DenoiseConfig(dtype="float32"), cluster=client, progress=False)
    model = load_model(model_path)
    assert out.axes == ("t", "c", "z", "y", "x")
    for c in range(2):
        for z in range(2):
            np.testing.assert_allclose(out.array[:, c, z], predict_array(model, raw[:, z, c]),
                                       atol=1e-3)


def _denoise_args(store: Path, model: Path, out: Path) -> list[str]:
    return ["denoise", str(store), "-m", str(model), "-o", str(out), "--block", "48,48,48",
            "--workers", "2", "--device", "cpu", "--no-progress"]


def test_sigkill_of_the_driver_then_rerun_is_byte_identical(tmp_path: Path, client: Client,
                                                            model_path: Path) -> None:
    store = _store(tmp_path, _poisson((192, 96, 96)), client)
    reference = tmp_path / "reference.zarr"
    first = run_cli(*_denoise_args(store, model_path, reference))
    assert first.returncode == 0, first.stderr
    # 4 × 2 × 2 blocks of 48³, each read with 48 more on every side: 3 × 3 × 3
    assert "the network passes over each voxel 27.00 times" in first.stderr

    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "deepcad_chunked.cli.main",
                             *_denoise_args(store, model_path, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    markers = out / ".progress" / "denoise"
    deadline = time.monotonic() + 240
    while not (markers.is_dir() and len(list(markers.glob("*.done"))) >= 3):
        assert proc.poll() is None, "denoise ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.done")))
    assert done < 16
    result = run_cli(*_denoise_args(store, model_path, out))
    assert result.returncode == 0, result.stderr
    assert f"{16 - done} of 16 blocks to do" in result.stderr
    assert stored_chunks(out) == stored_chunks(reference)


def test_a_worker_killed_mid_run_does_not_fail_the_job(tmp_path: Path, client: Client,
                                                       model_path: Path) -> None:
    raw = _poisson((192, 96, 96), seed=3)
    store = _store(tmp_path, raw, client)
    out = tmp_path / "o.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as own:
        pids = list(own.run(os.getpid).values())
        markers = out / ".progress" / "denoise"

        def kill_one() -> None:
            while not (markers.is_dir() and list(markers.glob("*.done"))):
                time.sleep(0.02)
            os.kill(pids[0], signal.SIGKILL)

        killer = threading.Thread(target=kill_one, daemon=True)
        killer.start()
        rec = denoise(store, model_path, out, config=DenoiseConfig(block=(48, 48, 48),
                                                                   dtype="float32"),
                      cluster=own, progress=False)
        killer.join(timeout=5)
    assert not killer.is_alive()
    want = predict_array(load_model(model_path), raw)
    assert np.abs(rec.array[:] - want).max() <= 1e-4 * float(raw.max() - raw.min())


def test_bad_input(tmp_path: Path, client: Client, model_path: Path) -> None:
    store = _store(tmp_path, _poisson((40, 24, 24)), client)
    out = str(tmp_path / "o.zarr")
    (tmp_path / "notes.pt").write_text("not a model")
    other = Checkpoint.load(model_path)
    other.features = 4  # a checkpoint whose weights are for another network
    other.save(tmp_path / "other.pt")
    incomplete = _store(tmp_path, _poisson((40, 24, 24)), client, name="inc")
    update_attrs(incomplete, complete=False)
    cases = [
        (["-m", str(tmp_path / "none.pt")], "does not exist"),
        (["-m", str(tmp_path / "notes.pt")], "not a readable model"),
        (["-m", str(tmp_path / "other.pt")], "do not fit"),
        (["-m", str(model_path), "--block", "16,48,48"], "smaller than the halo"),
        (["-m", str(model_path), "--block", "48,44,48"], "multiples of 8"),
        (["-m", str(model_path), "--halo", "12"], "multiple of 8"),
        (["-m", str(model_path), "--tile-memory", "1MB"], "not even an 8-voxel tile"),
        (["-m", str(model_path), "--device", "cuda", "--workers", "1"], "no CUDA device"),
        (["-m", str(model_path), "--cluster", "tcp://127.0.0.1:9"], "cannot reach"),
    ]
    for extra, needle in cases:
        assert_clean_error(run_cli("denoise", str(store), "-o", out, *extra, timeout=120),
                           needle)
        assert not Path(out).exists(), extra
    assert_clean_error(run_cli("denoise", str(incomplete), "-m", str(model_path), "-o", out),
                       "incomplete")
    Path(out).mkdir()
    (Path(out) / "zarr.json").write_text("{}")
    assert_clean_error(run_cli("denoise", str(store), "-m", str(model_path), "-o", out),
                       "already exists")
    assert open_recording(store).complete


def test_the_graph_of_a_segment_does_not_grow_with_the_recording(tmp_path: Path,
                                                                 model_path: Path) -> None:
    tasks = {}
    for frames in (960, 96_000):  # 100× longer; unwritten chunks read as zeros
        path = tmp_path / f"r{frames}.zarr"
        path.mkdir()
        create_image(path, shape=(frames, 64, 64), dtype=np.dtype(np.uint16),
                     chunks=(16, 64, 64), axes=("t", "y", "x"), scale=[1.0, 1.0, 1.0],
                     units={}, zarr_format=3, compression=CompressionConfig(),
                     attrs={"format": 1, "kind": "recording", "complete": True})
        layout = Layout(block=(48, 64, 64), halo=48, device="cpu", max_voxels=10**9,
                        pieces=(48, 64, 64), segment=96)
        job = _Job(open_recording(path), model_path, tmp_path / "out.zarr", tmp_path / "m",
                   layout, np.dtype(np.uint16), DenoiseConfig(), resources=None)
        assert job.count() == (frames // 48, frames // 48)
        segments = job.segments()
        first, second = next(segments), next(segments)
        assert len(first) == len(second) == 2
        tasks[frames] = [len(dict(dask.optimize(dask.delayed(s))[0].__dask_graph__()))
                         for s in (first, second)]
    assert tasks[960] == tasks[96_000]


@pytest.mark.parametrize("resources", [INFERENCE_RESOURCES, {"GPU": 1}],
                         ids=["local inference worker", "GPU worker"])
def test_forward_passes_hold_the_worker_slot_and_reads_and_writes_run_beside_them(
        tmp_path: Path, client: Client, model_path: Path, resources: dict[str, int]) -> None:
    """A local inference worker (two threads, one forward slot) or a GPU worker (here one
    that only advertises a GPU) never runs two passes at once, and reads the next blocks
    and writes finished ones while a pass runs."""
    from distributed import get_task_stream

    raw = _poisson((192, 64, 64), seed=8)
    store = _store(tmp_path, raw, client)
    with LocalCluster(n_workers=1, threads_per_worker=INFERENCE_THREADS,
                      resources=resources, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as own, \
            get_task_stream(own) as stream:
        rec = denoise(store, model_path, tmp_path / "o.zarr",
                      config=DenoiseConfig(block=(16, 64, 64), halo=16, dtype="float32"),
                      cluster=own, progress=False)
    spans: dict[str, list[tuple[float, float]]] = {}
    for task in stream.data:
        kind = task["key"][0] if isinstance(task["key"], tuple) else task["key"]
        for part in task["startstops"]:
            if part["action"] == "compute":
                spans.setdefault(kind.split("-")[0], []).append((part["start"], part["stop"]))
    passes = sorted(spans.pop("denoise_block"))
    assert len(passes) == 192 // 16
    # the worker stamps a task's stop a moment after it frees the slot (near 0.1 s on a
    # loaded machine), while two passes run together would overlap for most of their length
    overlaps = [(a, b) for a, b in pairwise(passes) if a[1] - b[0] > slack(a, b)]
    assert not overlaps, overlaps
    others = [s for kind in ("from", "write") for s in spans[kind]]
    beside = [s for s in others if any(s[0] < p[1] and p[0] < s[1] for p in passes)]
    assert beside, "no read or write ran during a forward pass"
    want = predict_array(load_model(model_path), raw, halo=16)
    assert np.abs(rec.array[:] - want).max() <= 1e-4 * float(raw.max() - raw.min())


def slack(a: tuple[float, float], b: tuple[float, float]) -> float:
    """How much two consecutive passes' recorded spans may overlap without having run
    together: the worker's late stamps (0.05 s) or a third of the shorter pass."""
    return max(0.05, (min(a[1] - a[0], b[1] - b[0])) / 3)
