"""Lag of ``follow`` behind a simulated acquisition, and the fastest acquisition it keeps up with.

Usage: python benchmarks/realtime.py [--size 128] [--features 4] [--rates 30,60,120]
       [--seconds 30] [--block-frames 16] [--device cpu] [--burst] [--record]

For each rate, ``deepcad-chunked simulate --acquire`` (its own process, as a microscope's
software is) writes SIZE² uint16 frames in real time into a folder, 500 per file, the newest
file growing page by page, and writes ``STOP`` after SECONDS seconds of frames. ``follow``
(this process, its LocalCluster of one worker on every core) denoises them with a
FEATURES-feature network of random weights (its speed does not depend on the weights).

The lag of a block is the time from its last frame being written (the page's own time stamp)
to the block's denoised frames being stored. Exactness needs ``block + halo`` frames after a
block's first frame, plus one frame (a page is taken once the next one begins): that floor is
printed beside the lags. The lag stays bounded when denoising keeps up: the table gives the
slope of the lag over the acquisition (seconds of lag gained per second; near 0 when it keeps
up). ``--burst`` adds a run where every frame is there at once: the denoising's own rate with
the largest tasks, the most any acquisition rate can be kept up with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import machine, publish

from deepcad_chunked.config import DenoiseConfig, FollowConfig
from deepcad_chunked.infer.predict import default_halo
from deepcad_chunked.jobs.follow import follow
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D

#: Seconds the acquisition waits for follow's cluster to start.
WARMUP_S = 12.0


def _acquire(folder: Path, size: int, frames: int, rate: float, delay: float) -> None:
    time.sleep(delay)
    subprocess.run([sys.executable, "-m", "deepcad_chunked.cli.main", "-q", "simulate",
                    "--acquire", str(folder / "src"), "--frames", str(frames), "--size",
                    f"{size},{size}", "--rate", str(rate), "--frames-per-file", "500",
                    "--stop"], check=True)


def _written(folder: Path) -> np.ndarray:
    """When each frame was written, from the pages' descriptions."""
    times = []
    for path in sorted((folder / "src").glob("*.tif")):
        with tifffile.TiffFile(path) as tif:
            times += [json.loads(p.description)["time"] for p in tif.pages]
    return np.array(times)


def run(size: int, model: Path, rate: float, frames: int, block: int, device: str,
        burst: bool) -> dict[str, float]:
    """One acquisition followed; its lags and rates."""
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        folder = Path(tmp)
        (folder / "src").mkdir()
        stored: list[tuple[int, int, float]] = []
        if burst:  # every frame there before follow starts
            _acquire(folder, size, frames, 1e6, 0.0)
            writer = None
        else:
            writer = threading.Thread(target=_acquire,
                                      args=(folder, size, frames, rate, WARMUP_S))
            writer.start()
        config = FollowConfig(block_frames=block, idle_timeout=120,
                              denoise=DenoiseConfig(device=device))
        follow(folder / "src", model, folder / "out", config=config,
               on_block=lambda *b: stored.append(b))
        if writer is not None:
            writer.join()
        written = _written(folder)
    ends = np.array([written[stop - 1] for _, stop, _ in stored])
    lags = np.array([at for _, _, at in stored]) - ends
    last = written[-1]
    during = ends < last - 1.0  # blocks whose frames came before the acquisition's end
    slope = (float(np.polyfit(ends[during] - ends[0], lags[during], 1)[0])
             if during.sum() >= 4 else float("nan"))
    # the denoising's pace once it is running: frames after the first block per second
    first = min(stored, key=lambda b: b[2])
    span = max(at for _, _, at in stored) - first[2]
    return {"frames": frames, "rate": rate, "median": float(np.median(lags)),
            "p95": float(np.percentile(lags, 95)), "max": float(lags.max()), "slope": slope,
            "blocks": len(stored),
            "throughput": (frames - (first[1] - first[0])) / span if span > 0 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--rates", default="30,60,120", help="Hz, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--block-frames", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    halo = default_halo()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Checkpoint(model_state=UNet3D(features=args.features).state_dict(),
                           features=args.features,
                           normalization={"mean": 100.0, "std": 20.0}).save(
                               Path(tmp) / "model.pt")
        rows = []
        for rate in [float(r) for r in args.rates.split(",") if r]:
            frames = int(rate * args.seconds)
            rows.append(run(args.size, model, rate, frames, args.block_frames, args.device,
                            burst=False))
            print(rows[-1], flush=True)
        if args.burst:
            frames = int(max([30.0, *(r["rate"] for r in rows)]) * args.seconds)
            rows.append(run(args.size, model, float("inf"), frames, args.block_frames,
                            args.device, burst=True))
            print(rows[-1], flush=True)
    lines = [f"Machine: {machine()}; device {args.device}; {args.size}² uint16 frames, a "
             f"{args.features}-feature network, block {args.block_frames} frames, halo "
             f"{halo}; {args.seconds:g} s of frames per rate.", "",
             "| acquisition | floor (block + halo + 1 frame) | lag median | lag p95 | lag max "
             "| lag slope (s/s) | blocks | denoised frames/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        burst = r["rate"] == float("inf")
        floor = "" if burst else f"{(args.block_frames + halo + 1) / r['rate']:.2f} s"
        kept = "" if burst or np.isnan(r["slope"]) else (
            " (keeps up)" if r["slope"] < 0.02 else " (falls behind)")
        what = "all frames at once" if burst else f"{r['rate']:g} Hz"
        lines.append(
            f"| {what} ({r['frames']} "
            f"frames) | {floor} | {r['median']:.2f} s | {r['p95']:.2f} s | {r['max']:.2f} s | "
            f"{r['slope']:+.3f}{kept} | {r['blocks']} | {r['throughput']:.1f} |")
    publish(f"Real-time lag, {args.size}² on {args.device}", "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
