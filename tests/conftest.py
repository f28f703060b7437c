"""Shared fixtures: a real dask.distributed LocalCluster, and helpers for running the CLI."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

# the napari plugin's tests draw on an offscreen Qt surface (no display needed)
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """Two single-threaded worker processes on loopback, shared by the library-level tests."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a 2-feature network with seeded random weights (mean 100, std 20)."""
    import torch

    from deepcad_chunked.model import Checkpoint
    from deepcad_chunked.model.unet3d import UNet3D

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return Checkpoint(model_state=UNet3D(features=2).state_dict(), features=2,
                      normalization={"mean": 100.0, "std": 20.0}).save(path)


def stored_chunks(store: Path) -> dict[str, bytes]:
    """Every file of a store's full-resolution array (chunks and metadata), by its path."""
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted((store / "0").rglob("*")) if p.is_file()}


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``deepcad-chunked ARGS`` in a real subprocess and capture its output; ``env``
    adds to (or overrides) this process's environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}  # type: ignore[dict-item]
    return subprocess.run([sys.executable, "-m", "deepcad_chunked.cli.main", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
                          **kwargs)


COMMAND = [sys.executable, "-m", "deepcad_chunked.cli.main"]


def start_cli(*args: str) -> subprocess.Popen[str]:
    """Start ``deepcad-chunked ARGS`` as a real process in a process group of its own (the
    command, its scheduler and workers: what a terminal's Ctrl-C or a batch job's SIGTERM
    reaches); its standard error is captured."""
    return subprocess.Popen([*COMMAND, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[str] | None = None,
               timeout: float = 240) -> None:
    """Poll for an event (a file appearing, a count reached) of a running command.

    Fails the test if the command ends first or nothing happens within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError("the command ended before the awaited event: "
                                 + (proc.stderr.read() if proc.stderr else ""))
        if time.monotonic() > deadline:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the awaited event did not happen")
        time.sleep(0.01)


@contextmanager
def paused(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Stop a command's whole process group (SIGSTOP) for the duration, then let it go on."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    """Wait for a started command; return its standard error."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return err


def lock_holder(lock: Path) -> int | None:
    """The process id written in a writer lock, or None when there is no lock."""
    try:
        return int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def group_alive(group: int) -> bool:
    """Whether a process of the group is still running (zombies awaiting reaping aside)."""
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(group)], capture_output=True,
                         text=True).stdout
    return any(not state.startswith("Z") for state in out.split())


def assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A failed command: non-zero exit, one line on stderr, no traceback, the words wanted."""
    assert result.returncode != 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]


@contextmanager
def _tmpfs(mountpoint: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at ``mountpoint`` for the duration; yields False where that is refused."""
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
                        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@contextmanager
def sized_fs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``256k``, ``6m``) mounted at ``folder`` (created): a real
    filesystem that fills up. Skips the test where mounting is not allowed."""
    folder.mkdir()
    with _tmpfs(folder, f"size={size}") as ok:
        if not ok:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        yield folder


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real filesystem that fills up. Skips where mounting is not allowed."""
    with sized_fs(tmp_path / "small", "256k") as mnt:
        yield mnt


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory no one can write to: a read-only tmpfs as root, chmod 555 otherwise."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    with _tmpfs(ro, "ro,size=64k") as ok:
        if not ok:
            pytest.skip("cannot make a read-only directory here (root, and mounting refused)")
        yield ro


@dataclass(frozen=True)
class S3:
    """A real S3 API server on loopback (moto's server mode) and a fresh bucket in it."""

    endpoint: str
    bucket: str

    def url(self, key: str) -> str:
        """``s3://BUCKET/KEY``."""
        return f"s3://{self.bucket}/{key}"

    @property
    def fs(self) -> Any:
        """An s3fs filesystem on the server, listing afresh every time."""
        return _s3fs(self.endpoint)

    def objects(self, key: str) -> dict[str, bytes]:
        """Every object under ``KEY/`` by its path below it, with its bytes."""
        root = f"{self.bucket}/{key}/"
        found = self.fs.cat(sorted(self.fs.find(root)))  # fetched concurrently
        return {k[len(root):]: v for k, v in sorted(found.items())}


@functools.lru_cache(maxsize=2)
def _s3fs(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False,
                             skip_instance_cache=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, for the whole session; the AWS_* variables that every
    command (and every worker it starts) reads point at it, with dummy credentials."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(s3_endpoint: str) -> S3:
    """A new, empty bucket on the loopback S3 server."""
    store = S3(endpoint=s3_endpoint, bucket=f"test-{uuid.uuid4().hex[:12]}")
    store.fs.mkdir(store.bucket)
    return store
