"""Denoising an acquisition while it is being written: growing TIFF folders, ``follow``,
its exactness, its interruptions and its refusals."""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from distributed import Client

from deepcad_chunked import convert, denoise
from deepcad_chunked.acquire import acquire
from deepcad_chunked.cluster import INFERENCE_RESOURCES
from deepcad_chunked.config import (
    INFERENCE_THREADS,
    ConvertConfig,
    DenoiseConfig,
    FollowConfig,
    SimulationConfig,
)
from deepcad_chunked.errors import SourceError
from deepcad_chunked.infer.predict import denoise_dask
from deepcad_chunked.jobs.follow import follow
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.simulate import CHUNK, clean_chunks, detect
from deepcad_chunked.sources.growing import STOP_FILE, FolderWatch, GrowingTiff
from deepcad_chunked.store.recording import open_recording
from tests.conftest import assert_clean_error, finish, run_cli, start_cli, wait_until
from tests.test_deepcad_rt import F_MAPS, _save, deepcad_rt_state
from tests.test_denoise import slack

SIZE = (32, 40)


@pytest.fixture(scope="module")
def loud_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny network whose output follows its input (a range of ~10 on Poisson(100) noise):
    a misplaced frame or a wrong mirror shows far above float rounding."""
    torch.manual_seed(0)
    state = UNet3D(features=2).state_dict()
    state["final.weight"] *= 300
    path = tmp_path_factory.mktemp("loud") / "loud.pt"
    return Checkpoint(model_state=state, features=2,
                      normalization={"mean": 100.0, "std": 20.0}).save(path)


def _simulation(frames: int, seed: int = 0) -> SimulationConfig:
    return SimulationConfig(frames=frames, size=SIZE, seed=seed, neurons=3)


def _simulated(config: SimulationConfig) -> np.ndarray:
    return np.concatenate([detect(p, config, s // CHUNK) for s, p, _ in clean_chunks(config)])


def _sequential_tiff(frames: np.ndarray) -> bytes:
    """A classic TIFF laid out as ScanImage writes it, strictly front to back: each page's
    IFD (its next-IFD pointer already filled in) and then its samples."""
    n, height, width = frames.shape
    entries = [(256, 3, width), (257, 3, height), (258, 3, 16), (259, 3, 1), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 3, height), (279, 4, height * width * 2)]
    ifd_bytes = 2 + 12 * len(entries) + 4
    page = ifd_bytes + height * width * 2
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for k in range(n):
        at = 8 + k * page
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            value = at + ifd_bytes if tag == 273 else value
            out += struct.pack("<HHI", tag, kind, 1) + struct.pack(
                "<I" if kind == 4 else "<HH", *((value,) if kind == 4 else (value, 0)))
        out += struct.pack("<I", at + page if k < n - 1 else 0)
        out += frames[k].astype("<u2").tobytes()
    return bytes(out)


def test_a_page_is_taken_only_once_the_writer_has_moved_past_it(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 65535, (5, 6, 7), dtype=np.uint16)
    whole = _sequential_tiff(frames)
    path = tmp_path / "growing.tif"
    page, ifd = (len(whole) - 8) // 5, 2 + 12 * 9 + 4
    for length in range(0, len(whole) + 1, 13):  # every stage a sequential writer goes through
        path.write_bytes(whole[:length])
        growing = GrowingTiff(path)
        n = growing.scan(finished=False)
        assert n == min(4, max(0, (length - 8 - ifd) // page)), length  # next IFD written
        if n:
            assert np.array_equal(growing.read(0, n), frames[:n])
    # tifffile writes a page's samples before its IFD and links that IFD first: the same rule
    growing, written = GrowingTiff(tmp_path / "tifffile.tif"), []
    with open(growing.path, "wb", buffering=0) as fh, tifffile.TiffWriter(fh) as writer:
        for frame in frames:
            writer.write(frame, contiguous=False, metadata=None, photometric="minisblack")
            written.append(growing.scan(finished=False))
    assert written == [0, 1, 2, 3, 4]
    assert growing.scan(finished=True) == 5
    assert np.array_equal(growing.read(0, 5), frames)


def test_a_last_file_cut_in_a_page_is_refused_when_the_acquisition_ends(tmp_path: Path
                                                                        ) -> None:
    frames = np.arange(4 * 6 * 7, dtype=np.uint16).reshape(4, 6, 7)
    (tmp_path / "file_00001.tif").write_bytes(_sequential_tiff(frames)[:-10])
    watch = FolderWatch(tmp_path)
    assert np.array_equal(watch.poll(ended=False), frames[:3])  # the cut page is not taken
    with pytest.raises(SourceError, match="half-written page"):
        watch.poll(ended=True)


def test_files_out_of_order_replaced_or_of_another_shape_are_refused(tmp_path: Path) -> None:
    frames = np.zeros((3, 6, 7), np.uint16)
    gray = {"photometric": "minisblack"}
    tifffile.imwrite(tmp_path / "a_2.tif", frames, **gray)
    tifffile.imwrite(tmp_path / "a_3.tif", frames, **gray)
    watch = FolderWatch(tmp_path)
    assert len(watch.poll()) == 3 + 2  # a_2 is finished (a_3 exists); a_3's last page may
    # still be being written
    tifffile.imwrite(tmp_path / "a_1.tif", frames, **gray)
    with pytest.raises(SourceError, match="comes before it"):
        watch.poll()
    (tmp_path / "a_1.tif").unlink()
    other = FolderWatch(tmp_path)
    other.poll()
    tifffile.imwrite(tmp_path / "a_4.tif", np.zeros((3, 8, 7), np.uint16), **gray)
    with pytest.raises(SourceError, match="6×7 uint16"):
        other.poll()
    third = FolderWatch(tmp_path, pattern="a_[23].tif")
    third.poll()
    os.replace(tmp_path / "a_2.tif", tmp_path / "a_3.tif")  # the growing one replaced
    with pytest.raises(SourceError, match=r"replaced|removed"):
        third.poll(ended=True)


def _reference(tmp_path: Path, source: Path, model: Path, client: Client
               ) -> tuple[np.ndarray, np.ndarray]:
    """convert, then denoise, of the finished files: what follow must have written."""
    rec = convert(source, tmp_path / "ref.zarr", config=ConvertConfig(shards="none"),
                  cluster=client, progress=False)
    out = denoise(rec.path, model, tmp_path / "ref-out.zarr",
                  config=DenoiseConfig(dtype="float32", block=(64, 32, 40)), cluster=client,
                  progress=False)
    return rec.array[:], out.array[:]


def test_follow_while_acquiring_equals_convert_then_denoise(tmp_path: Path, loud_model: Path,
                                                            client: Client) -> None:
    sim = _simulation(240)
    source = tmp_path / "acquisition"
    writer = threading.Thread(target=acquire, args=(source, sim),
                              kwargs={"rate": 40.0, "frames_per_file": 70, "stop": True})
    writer.start()
    blocks: list[tuple[int, int, float]] = []
    try:
        result = follow(_wait_for(source), loud_model,
                        tmp_path / "out",
                        config=FollowConfig(denoise=DenoiseConfig(dtype="float32"),
                                            preview=tmp_path / "live.png", idle_timeout=30),
                        cluster=client, on_block=lambda *block: blocks.append(block))
    finally:
        writer.join()
    raw, want = _reference(tmp_path, source, loud_model, client)
    rec, got = result.recording, result.denoised
    assert rec.complete and got.complete and result.frames == 240
    assert rec.array.dtype == raw.dtype and np.array_equal(rec.array[:], raw)  # bit for bit
    assert np.array_equal(raw, _simulated(sim))
    assert rec.chunks == open_recording(tmp_path / "ref.zarr").chunks
    assert rec.statistics == open_recording(tmp_path / "ref.zarr").statistics
    assert np.abs(got.array[:] - want).max() <= 1e-4 * float(np.ptp(raw))
    assert np.ptp(want) > 1.0  # the comparison can tell frames apart
    # blocks were denoised while frames kept arriving, a few frames at a time
    covered = sorted(blocks)
    assert covered[0][0] == 0 and covered[-1][1] == 240
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert len(result.lag_s) == len(blocks)
    with tifffile.TiffFile(sorted(source.glob("*.tif"))[-1]) as tif:
        last_written = json.loads(tif.pages[-1].description)["time"]
    assert covered[0][2] < last_written  # the first frames were denoised during acquisition
    import matplotlib.image

    png = matplotlib.image.imread(tmp_path / "live.png")
    assert png.shape[0] == SIZE[0] and png.shape[1] > 2 * SIZE[1]
    assert not list(tmp_path.glob(".live.png.*"))  # written aside, renamed into place


def _wait_for(path: Path) -> Path:
    wait_until(path.exists, timeout=30)
    return path


def test_a_deepcad_rt_model_uses_the_first_blocks_mean(tmp_path: Path, client: Client
                                                      ) -> None:
    model = _save(tmp_path / "m", deepcad_rt_state(F_MAPS, seed=3), f"fmap: {F_MAPS}\n")
    acquire(tmp_path / "src", _simulation(100, seed=2), rate=5000, frames_per_file=40,
            stop=True)
    config = FollowConfig(denoise=DenoiseConfig(dtype="float32"), block_frames=16)
    result = follow(tmp_path / "src", model, tmp_path / "out", config=config, cluster=client)
    norm = result.denoised.attrs["normalization"]
    raw = result.recording.array[:]
    assert norm["frames"] == [0, 16 + 48]
    assert norm["recording_mean"] == pytest.approx(raw[:64].mean(dtype=np.float64))
    import dask.array as da

    want = denoise_dask(da.from_array(raw, chunks=(32, 32, 40)), model, block=(48, 32, 40),
                        recording_mean=norm["recording_mean"]).compute()
    assert np.abs(result.denoised.array[:] - want).max() <= 1e-4 * float(np.ptp(raw))


def _markers(out: Path) -> int:
    return len(list((out / "denoised.zarr" / ".progress" / "follow").glob("*.done")))


def test_follow_stopped_and_killed_resumes_to_the_same_result(tmp_path: Path,
                                                              loud_model: Path,
                                                              client: Client) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    # no STOP until the test writes it: no run can finish before it is stopped
    writer = threading.Thread(target=acquire, args=(source, _simulation(480, seed=5)),
                              kwargs={"rate": 40.0, "frames_per_file": 100})
    writer.start()
    args = (str(_wait_for(source)), "-m", str(loud_model), "-o", str(out), "--dtype",
            "float32", "--workers", "1", "--idle-timeout", "60")
    try:
        proc = start_cli("follow", *args)
        wait_until(lambda: _markers(out) >= 1, proc, timeout=120)
        second = run_cli("follow", *args[:-4], "--workers", "1", "--overwrite")
        assert_clean_error(second, "being written by 'follow'")  # one writer at a time
        os.killpg(proc.pid, signal.SIGTERM)  # a batch system cancelling the job
        err = finish(proc)
        assert proc.returncode == 143, err
        for store in ("recording.zarr", "denoised.zarr"):
            with pytest.raises(Exception, match="incomplete"):
                open_recording(out / store)
        before = _markers(out)
        proc = start_cli("follow", *args)
        wait_until(lambda: _markers(out) > before, proc, timeout=120)
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to tidy up
        finish(proc)
        writer.join()
        (source / STOP_FILE).touch()
        done = run_cli("follow", *args, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "resuming" in done.stderr
    finally:
        writer.join()
    raw, want = _reference(tmp_path, source, loud_model, client)
    rec, got = open_recording(out / "recording.zarr"), open_recording(out / "denoised.zarr")
    assert np.array_equal(rec.array[:], raw)
    assert rec.statistics == open_recording(tmp_path / "ref.zarr").statistics
    assert np.abs(got.array[:] - want).max() <= 1e-4 * float(np.ptp(raw))
    again = run_cli("follow", *args)
    assert_clean_error(again, "already holds the finished")


def test_bad_acquisitions_and_outputs_are_one_line_errors(tmp_path: Path, tiny_model: Path
                                                          ) -> None:
    acquire(tmp_path / "a", _simulation(70), rate=5000, frames_per_file=40, stop=True)
    common = ("-m", str(tiny_model), "--workers", "1", "--idle-timeout", "2")
    # a file of another frame shape
    tifffile.imwrite(tmp_path / "a" / "file_00003.tif", np.zeros((5, 16, 16), np.uint16),
                     photometric="minisblack")
    result = run_cli("follow", str(tmp_path / "a"), "-o", str(tmp_path / "o1"), *common)
    assert_clean_error(result, "file_00003.tif", "16×16 uint16", "32×40 uint16")
    assert not (tmp_path / "o1" / "recording.zarr").exists()  # refused before any write
    (tmp_path / "a" / "file_00003.tif").unlink()
    done = run_cli("follow", str(tmp_path / "a"), "-o", str(tmp_path / "o1"), *common)
    assert done.returncode == 0, done.stderr
    # the last file stops growing half way through a page
    acquire(tmp_path / "cut", _simulation(70), rate=5000, frames_per_file=40)  # idle ends it
    last = tmp_path / "cut" / "file_00002.tif"
    last.write_bytes(last.read_bytes()[:-100])
    result = run_cli("follow", str(tmp_path / "cut"), "-o", str(tmp_path / "o4"), *common)
    assert_clean_error(result, "file_00002.tif", "half-written page")
    for store in ("recording.zarr", "denoised.zarr"):
        assert not open_recording(tmp_path / "o4" / store, require_complete=False).complete
    # OUTDIR holding another recording
    acquire(tmp_path / "b", _simulation(50, seed=9), rate=5000, frames_per_file=40,
            stop=True)
    assert_clean_error(run_cli("follow", str(tmp_path / "b"), "-o", str(tmp_path / "o1"),
                               *common), "already exists", "--overwrite")
    assert np.array_equal(open_recording(tmp_path / "o1" / "recording.zarr").array[:],
                          _simulated(_simulation(70)))
    # a model for another network
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    assert_clean_error(run_cli("follow", str(tmp_path / "b"), "-m", str(tmp_path / "bad.pt"),
                               "-o", str(tmp_path / "o2"), "--workers", "1"))
    assert not (tmp_path / "o2" / "recording.zarr").exists()
    # nothing arrives; an output inside the watched folder
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("follow", str(tmp_path / "empty"), "-o", str(tmp_path / "o3"),
                               *common), "no recording arrived")
    assert not (tmp_path / "o3" / "recording.zarr").exists()
    assert_clean_error(run_cli("follow", str(tmp_path / "b"), "-o", str(tmp_path / "b" / "o"),
                               *common), "lies inside")
    # frames with NaN: the acquisition's fault, said as such (not the model's)
    (tmp_path / "nan").mkdir()
    frames = _simulated(_simulation(70)).astype(np.float32)
    frames[45, 3, 3] = np.nan
    for i, start in enumerate(range(0, 70, 35)):
        tifffile.imwrite(tmp_path / "nan" / f"file_{i + 1:05d}.tif", frames[start:start + 35],
                         photometric="minisblack")
    (tmp_path / "nan" / STOP_FILE).touch()
    result = run_cli("follow", str(tmp_path / "nan"), "-o", str(tmp_path / "o5"), *common)
    assert_clean_error(result, "frame 45 of the acquisition holds NaN or infinite samples")


def test_simulate_acquire_writes_files_as_a_microscope_does(tmp_path: Path) -> None:
    result = run_cli("simulate", "--acquire", str(tmp_path / "d"), "--frames", "40", "--size",
                     "32,40", "--neurons", "3", "--rate", "400", "--frames-per-file", "16",
                     "--stop")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == [STOP_FILE, "file_00001.tif", "file_00002.tif", "file_00003.tif"]
    with tifffile.TiffFile(tmp_path / "d" / "file_00002.tif") as tif:
        stamps = [json.loads(p.description) for p in tif.pages]
    assert [s["frame"] for s in stamps] == list(range(16, 32))
    # paced: frame k is written no sooner than k / rate after frame 0 (a writer behind its
    # schedule on a busy machine may catch up, so single gaps can be short)
    with tifffile.TiffFile(tmp_path / "d" / "file_00001.tif") as tif:
        first = json.loads(tif.pages[0].description)
    assert all(s["time"] - first["time"] >= s["frame"] / 400 - 0.002 for s in stamps)
    assert stamps[-1]["time"] > stamps[0]["time"]
    frames = np.concatenate([tifffile.imread(tmp_path / "d" / n) for n in names[1:]])
    assert np.array_equal(frames, _simulated(_simulation(40)))
    assert_clean_error(run_cli("simulate", "--acquire", str(tmp_path / "d"), "--frames", "8"),
                       "already holds")


@pytest.mark.parametrize("resources", [INFERENCE_RESOURCES, {"GPU": 1}],
                         ids=["local inference worker", "GPU worker"])
def test_follow_passes_hold_the_worker_slot_and_reads_and_writes_run_beside_them(
        tmp_path: Path, loud_model: Path, resources: dict[str, int]) -> None:
    """As denoise: a span is read, passed through the network and written in three tasks,
    only the pass holding the worker's forward slot (or GPU), so passes never overlap while
    the next spans are read and finished ones written."""
    from distributed import LocalCluster, get_task_stream

    source = tmp_path / "acquisition"
    acquire(source, _simulation(256), rate=1e4, frames_per_file=64, stop=True)
    with LocalCluster(n_workers=1, threads_per_worker=INFERENCE_THREADS,
                      resources=resources, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as own, \
            get_task_stream(own) as stream:
        result = follow(source, loud_model, tmp_path / "out",
                        config=FollowConfig(denoise=DenoiseConfig(dtype="float32"),
                                            block_frames=16, max_block_frames=16,
                                            idle_timeout=30), cluster=own)
    assert result.denoised.complete and result.frames == 256
    spans: dict[str, list[tuple[float, float]]] = {}
    for task in stream.data:
        kind = str(task["key"]).split("-")
        if kind[0] == "follow":
            spans.setdefault(kind[1], []).extend(
                (p["start"], p["stop"]) for p in task["startstops"] if p["action"] == "compute")
    passes = sorted(spans["pass"])
    assert len(passes) == len(spans["read"]) == len(spans["write"]) == 256 // 16
    overlaps = [(a, b) for a, b in itertools.pairwise(passes) if a[1] - b[0] > slack(a, b)]
    assert not overlaps, overlaps
    beside = [s for s in spans["read"] + spans["write"]
              if any(s[0] < p[1] and p[0] < s[1] for p in passes)]
    assert beside, "no read or write ran during a pass"
