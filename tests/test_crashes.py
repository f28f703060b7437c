"""Crashes and interruptions of real command processes.

SIGKILL of the whole process group (command, scheduler, workers) at several points drawn at
random (seeded) for convert, train and denoise: each rerun goes on from the finished work and
the last one ends identical to an uninterrupted run. Ctrl-C (SIGINT to the process group, as a
terminal sends it): exit code 130, one line saying how to resume, no traceback from any
process, and the rerun finishes the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client

from deepcad_chunked import ConvertConfig, convert
from deepcad_chunked.model import Checkpoint
from tests.conftest import group_alive, run_cli, start_cli, stored_chunks
from tests.tiffs import write_plain

SEED = int(os.environ.get("DEEPCAD_CRASH_SEED", "20261123"))


def _start(args: list[str]) -> subprocess.Popen[str]:
    return start_cli(*args)


def _stop_when(proc: subprocess.Popen[str], ready: Callable[[], bool], sig: int,
               timeout: float = 240) -> str:
    """Send ``sig`` to the command's process group once ``ready()``; return its stderr.

    After a SIGINT (SIGTERM) the command must have exited with 130 (143) and left no process
    behind.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail("the command finished before it could be stopped: "
                        + (proc.stderr.read() if proc.stderr else ""))
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the command made no progress")
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if sig == signal.SIGKILL:
        return err
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
    deadline = time.monotonic() + 10
    while group_alive(proc.pid):  # nothing of the command may outlive a Ctrl-C
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("processes of the interrupted command are still running")
        time.sleep(0.1)
    return err


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def _points(total: int, n: int) -> list[int]:
    """``n`` increasing kill points in ``[0, total)``, the first at 0 (right at the start)."""
    rng = np.random.default_rng(SEED + total)
    return [0, *sorted(rng.choice(np.arange(1, int(total * 0.9)), n - 1, replace=False))]


@pytest.fixture(scope="module")
def movie(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = np.random.default_rng(7).poisson(40.0, size=(1200, 48, 48)).astype(np.uint16)
    return write_plain(tmp_path_factory.mktemp("crash") / "long.tif", data)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    folder = tmp_path_factory.mktemp("crash-store")
    data = np.random.default_rng(8).poisson(100.0, size=(192, 96, 96)).astype(np.uint16)
    return convert(write_plain(folder / "rec.tif", data), folder / "rec.zarr",
                   config=ConvertConfig(chunks=(16, 48, 48)), cluster=client,
                   progress=False).path


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    return tiny_model


def _convert(src: Path, out: Path) -> list[str]:
    return ["convert", str(src), "-o", str(out), "--chunks", "2,48,48", "--shard", "2,48,48",
            "--workers", "1",
            "--no-progress"]


def _denoise(store: Path, model: Path, out: Path) -> list[str]:
    return ["denoise", str(store), "-m", str(model), "-o", str(out), "--block", "48,48,48",
            "--workers", "2", "--device", "cpu", "--no-progress"]


def _train(store: Path, run: Path) -> list[str]:
    return ["train", str(store), "-o", str(run), "--patch", "8,16,16", "--features", "4",
            "--batch-size", "4", "--epochs", "5", "--steps-per-epoch", "30", "--workers", "0",
            "--device", "cpu", "--no-progress", "--resume"]


def test_convert_killed_at_several_points(tmp_path: Path, movie: Path) -> None:
    reference = tmp_path / "reference.zarr"
    assert run_cli(*_convert(movie, reference)).returncode == 0
    out = tmp_path / "out.zarr"
    markers = out / ".progress" / "convert"
    done = []
    for point in _points(600, 4):
        ready = ((lambda: (out / "zarr.json").exists()) if point == 0
                 else (lambda p=point: _count(markers, "*.npz") >= p))
        _stop_when(_start(_convert(movie, out)), ready, signal.SIGKILL)
        done.append(_count(markers, "*.npz"))
    assert done == sorted(done) and done[-1] < 600  # finished work was kept each time
    result = run_cli(*_convert(movie, out))
    assert result.returncode == 0, result.stderr
    assert f"{600 - done[-1]} of 600 slabs to do" in result.stderr
    assert stored_chunks(out) == stored_chunks(reference)


def test_denoise_killed_at_several_points(tmp_path: Path, store: Path, model: Path) -> None:
    reference = tmp_path / "reference.zarr"
    assert run_cli(*_denoise(store, model, reference)).returncode == 0
    out = tmp_path / "out.zarr"
    markers = out / ".progress" / "denoise"
    done = []
    for point in _points(16, 3):
        ready = ((lambda: (out / "zarr.json").exists()) if point == 0
                 else (lambda p=point: _count(markers, "*.done") >= p))
        _stop_when(_start(_denoise(store, model, out)), ready, signal.SIGKILL)
        done.append(_count(markers, "*.done"))
    assert done == sorted(done) and done[-1] < 16
    result = run_cli(*_denoise(store, model, out))
    assert result.returncode == 0, result.stderr
    assert f"{16 - done[-1]} of 16 blocks to do" in result.stderr
    assert stored_chunks(out) == stored_chunks(reference)


def test_train_killed_at_several_points(tmp_path: Path, store: Path) -> None:
    reference = tmp_path / "reference"
    assert run_cli(*_train(store, reference)).returncode == 0
    run = tmp_path / "run"
    rng = np.random.default_rng(SEED)
    # during the first epoch (after a random number of steps' worth of time), then after
    # epochs drawn at random
    first = _start(_train(store, run))
    started = time.monotonic()
    wait = float(rng.uniform(0.5, 2.0))
    _stop_when(first, lambda: time.monotonic() - started > wait and run.is_dir(),
               signal.SIGKILL)
    for epoch in sorted(rng.choice([1, 2, 3, 4], 2, replace=False)):
        _stop_when(_start(_train(store, run)),
                   lambda e=epoch: (run / f"epoch_{e:04d}.pt").exists(), signal.SIGKILL)
        assert not (run / "epoch_0005.pt").exists()
    result = run_cli(*_train(store, run))
    assert result.returncode == 0, result.stderr
    want = Checkpoint.load(reference / "last.pt").model_state
    got = Checkpoint.load(run / "last.pt").model_state
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert Checkpoint.load(run / "last.pt").epoch == 5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("command", ["convert", "denoise", "train", "train --devices 2"])
def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(command: str, sig: int, tmp_path: Path,
                                                     movie: Path, store: Path,
                                                     model: Path) -> None:
    """Ctrl-C, and SIGTERM (a batch system's scancel or walltime), alike."""
    out = tmp_path / ("run" if command == "train" else "out.zarr")
    if command == "convert":
        args = _convert(movie, out)
        ready = lambda: _count(out / ".progress" / "convert", "*.npz") >= 20  # noqa: E731
    elif command == "denoise":
        args = _denoise(store, model, out)
        ready = lambda: _count(out / ".progress" / "denoise", "*.done") >= 2  # noqa: E731
    else:  # in this process, or in two data-parallel ones
        args = _train(store, out) + command.split()[1:]
        ready = lambda: (out / "epoch_0001.pt").exists()  # noqa: E731
    err = _stop_when(_start(args), ready, sig)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "leaked" not in err, err  # no semaphore left behind by a killed process
    said = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert lines[-1] == (f"deepcad-chunked: {said}; rerun the same command to resume "
                         "where it stopped"), err
    assert not any(" - ERROR - " in line or " - WARNING - " in line for line in lines), err
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    if command.startswith("train"):
        assert "resuming" in result.stderr
    else:
        assert "of 600 slabs to do" in result.stderr or "of 16 blocks to do" in result.stderr


SWALLOWED = """
import gc, os, signal, threading, time
from deepcad_chunked import interrupt
interrupt.install()
gc.callbacks.append(lambda phase, info: time.sleep(0.2))  # where Ctrl-C lands, mostly
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    for _ in range(200):
        gc.collect()
        interrupt.check()
    print("ran on")
except KeyboardInterrupt:
    print("stopped")
"""


def test_a_ctrl_c_swallowed_in_a_callback_still_stops_the_command() -> None:
    result = subprocess.run([sys.executable, "-c", SWALLOWED], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "stopped", result.stdout + result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr


CANCEL_RACE = """
import logging, os, signal, threading, time
from distributed.utils import LoopRunner, sync
from deepcad_chunked import interrupt
logging.basicConfig()
interrupt.install()
runner = LoopRunner(asynchronous=False)
runner.start()
runner.loop.add_callback(time.sleep, 1.0)  # the call cannot start before the Ctrl-C lands
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
async def work():
    return 1
try:
    sync(runner.loop, work)
    print("ran on")
except KeyboardInterrupt:
    print("stopped")
time.sleep(1.5)  # the loop runs distributed's cancel of the interrupted call
runner.stop()
"""


def test_a_ctrl_c_before_a_cluster_call_starts_prints_no_traceback() -> None:
    # distributed's cancel of such a call fails with a NameError that tornado logs
    result = subprocess.run([sys.executable, "-c", CANCEL_RACE], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "stopped", result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "NameError" not in result.stderr, result.stderr
