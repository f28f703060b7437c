"""Helpers shared by the benchmarks: test data, cold caches, timing and peak memory."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tifffile

from deepcad_chunked import TrainConfig, convert, load_model, train
from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.infer.predict import default_halo, predict_array
from deepcad_chunked.simulate import simulate


def machine() -> str:
    """One line describing this machine."""
    mem = psutil.virtual_memory().total / 2**30
    return (f"{platform.node()}: {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")


def noisy_frames(pool: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A pool of photon-limited two-photon-like frames (uint16): dim background, bright cells,
    Poisson noise plus a detector offset — compressible like real recordings, not more."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    clean = np.full((height, width), 8.0)
    for _ in range(height * width // 600):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, 8)
        clean += rng.uniform(5, 40) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    gain = rng.uniform(0.6, 1.8, size=(pool, 1, 1))
    photons = rng.poisson(clean[None] * gain)
    return (100 + 4 * photons + rng.normal(0, 3, photons.shape)).clip(0).astype(np.uint16)


def write_big_tiff(path: Path, frames: int, height: int, width: int, pool: int = 256) -> Path:
    """Write a BigTIFF of ``frames`` pages, one page per frame, cycling a pool of frames."""
    stack = noisy_frames(pool, height, width)

    def pages() -> Iterator[np.ndarray]:
        for t in range(frames):
            yield stack[t % pool]

    tifffile.imwrite(path, pages(), shape=(frames, height, width), dtype=np.uint16,
                     bigtiff=True, photometric="minisblack", metadata={"axes": "TYX"})
    return path


def drop_caches(paths: Sequence[Path]) -> str:
    """Evict files from the page cache; returns how (or that it could not)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped (echo 3 > /proc/sys/vm/drop_caches)"
    except OSError:
        pass
    done = 0
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                done += 1
            finally:
                os.close(fd)
    return f"evicted per file (posix_fadvise DONTNEED, {done} files)" if done else "NOT dropped"


@dataclass
class Measured:
    """Wall time and peak resident memory of a command and all its child processes.

    ``peak_rss_bytes`` is the largest summed RSS seen at one sample; ``peak_sum_bytes`` adds
    up each process's own peak, a bound that does not depend on whether the processes peak
    at the same moment (which a longer run makes more likely).
    """

    seconds: float
    peak_rss_bytes: int
    returncode: int
    peak_sum_bytes: int = 0


def run_measured(cmd: Sequence[str], interval: float = 0.05, **kwargs: object) -> Measured:
    """Run ``cmd`` and sample the summed RSS of its process tree until it exits."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), **kwargs)
    peak = 0
    own: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rss = p.memory_info().rss
                        total += rss
                        own[p.pid] = max(own.get(p.pid, 0), rss)
                peak = max(peak, total)
            except psutil.NoSuchProcess:
                return
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return Measured(seconds, peak, code, sum(own.values()))


def s3_server() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server on a free loopback port: (its process, its endpoint URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    raise SystemExit("moto's S3 server did not start")


def s3_bucket(endpoint: str, bucket: str = "bench") -> Any:
    """Point this process, and the commands it starts, at the S3 server at ``endpoint`` (test
    credentials) and make ``bucket``; its s3fs filesystem."""
    import s3fs

    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    fs.mkdir(bucket)
    return fs


def random_model(path: Path, features: int) -> Path:
    """A checkpoint of a ``features``-feature network with seeded random weights, normalised
    for :func:`write_big_tiff`'s recordings: for speed, not quality."""
    import torch

    from deepcad_chunked.model import Checkpoint
    from deepcad_chunked.model.unet3d import UNet3D

    torch.manual_seed(0)
    return Checkpoint(model_state=UNet3D(features=features).state_dict(), features=features,
                      normalization={"mean": 400.0, "std": 100.0}).save(path)


def publish(title: str, text: str, record: bool) -> None:
    """Print a benchmark's table; with ``record``, append it to RESULTS.md under a heading
    that names the command that made it (``--record`` left out)."""
    print(text)
    if record:
        command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}",
                            *(a for a in sys.argv[1:] if a != "--record")])
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(f"\n### {title} (`{command}`)\n\n{text}\n")


def denoise_in_memory(model_path: Path, raw: np.ndarray, piece: int = 200) -> np.ndarray:
    """The whole recording denoised by pieces of ``piece`` frames with an exact temporal halo."""
    model = load_model(model_path)
    halo = default_halo()
    out = np.empty(raw.shape, np.float32)
    for start in range(0, len(raw), piece):
        stop = min(len(raw), start + piece)
        a, b = max(0, start - halo), min(len(raw), stop + halo)
        out[start:stop] = predict_array(model, raw[a:b])[start - a:stop - a]
    return out


def demo_recording(work: Path, photons: float) -> tuple[Any, Path, np.ndarray]:
    """The demo's simulated recording (1200×128², seed 0) at ``photons`` per pixel and frame:
    its files (raw, clean, truth), the converted store, and the raw frames in memory."""
    files = simulate(work / "sim", SimulationConfig(frames=1200, size=(128, 128),
                                                    photons=photons, seed=0))
    rec = convert(files.raw, work / "sim.zarr", workers=1, progress=False).path
    return files, rec, tifffile.imread(files.raw)


def parity_streams(model_path: Path, raw: np.ndarray) -> np.ndarray:
    """Even and odd frames denoised as two separate half-rate recordings, interleaved back
    (the rate the network trained at; see ``parity.py``)."""
    out = np.empty(raw.shape, np.float32)
    for parity in (0, 1):
        out[parity::2] = denoise_in_memory(model_path, raw[parity::2])
    return out


def train_for(rec: Path, run: Path, options: dict[str, Any], seconds: float) -> tuple[Path, int,
                                                                                     float]:
    """Train ``options`` for about ``seconds``; (last checkpoint, steps, minutes taken).

    Two short probes (10 and 40 steps) give the time of a step without the run's start-up
    (loader processes, validation, checkpoints), which the budget's run then also pays.
    """
    common = {"workers": 2, "device": "cpu", "val_tiles": 4, "epochs": 1}
    took = []
    for n in (10, 40):
        t0 = time.perf_counter()
        train(rec, run / f"probe{n}", config=TrainConfig(**{**options, **common,
                                                            "steps_per_epoch": n}),
              progress=False)
        took.append(time.perf_counter() - t0)
    per_step = max(1e-3, (took[1] - took[0]) / 30)
    steps = max(20, int((seconds - took[0] + 10 * per_step) / per_step))
    t0 = time.perf_counter()
    result = train(rec, run / "real", config=TrainConfig(**{**options, **common,
                                                            "steps_per_epoch": steps}),
                   progress=False)
    return result.last, steps, (time.perf_counter() - t0) / 60
