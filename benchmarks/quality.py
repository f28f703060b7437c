"""Denoising quality on simulated recordings: ours against the raw data and Gaussian filters.

Usage: python benchmarks/quality.py [--photons 0.5 1 2] [--frames 1200] [--size 128]
       [--features 8] [--epochs 4] [--steps 150]

For each photon level: simulate (seed 0) → ``run`` (convert, train with the given budget,
denoise on a LocalCluster) → score against the ground truth (SNR, PSNR, mean Pearson r of the
neurons' traces), with the best of the Gaussian baselines. The denoised recording is kept in
float32, as the Gaussian baselines are. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine

from deepcad_chunked.config import DenoiseConfig, SimulationConfig, TrainConfig
from deepcad_chunked.jobs.run import run
from deepcad_chunked.metrics import score
from deepcad_chunked.simulate import simulate


def main() -> None:
    """Print the quality table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"# machine: {machine()}")
    print(f"# {args.frames} frames of {args.size}² px, f = {args.features}, "
          f"{args.epochs} × {args.steps} steps, patch 16,64,64, batch 2")
    print("\n| photons/px/frame | raw SNR dB | best Gaussian SNR dB | ours SNR dB | gain dB | "
          "gain over Gaussian dB | trace r raw / Gaussian / ours | train+denoise min |")
    print("|---|---|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        for photons in args.photons:
            sim = SimulationConfig(frames=args.frames, size=(args.size, args.size),
                                   photons=photons, seed=0)
            files = simulate(work / f"p{photons}", sim)
            t0 = time.perf_counter()
            out = run(files.raw, work / f"run{photons}", train_config=TrainConfig(
                features=args.features, epochs=args.epochs, steps_per_epoch=args.steps),
                denoise_config=DenoiseConfig(dtype="float32"), workers=args.workers,
                progress=False)
            minutes = (time.perf_counter() - t0) / 60
            s = score(out.denoised, files.clean, files.raw, footprints=files.truth)
            rows = {r["name"]: r for r in s["rows"]}
            raw, ours, gauss = rows["raw"], rows["denoised"], rows[s["best_gaussian"]]
            print(f"| {photons:g} | {raw['snr_db']:.2f} | {gauss['snr_db']:.2f} "
                  f"({s['best_gaussian'].removeprefix('gaussian ')}) | {ours['snr_db']:.2f} | "
                  f"{s['gain_db']:+.2f} | {s['gain_over_gaussian_db']:+.2f} | "
                  f"{raw['trace_r_mean']:.3f} / {gauss['trace_r_mean']:.3f} / "
                  f"{ours['trace_r_mean']:.3f} | {minutes:.1f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
