"""Choosing training defaults (learning rate, Adam betas, tile, batch, windows) by measurement.

Usage: python benchmarks/train_defaults.py [--steps 150] [--features 8] [--frames 600]

A simulated photon-limited recording with ground truth (blinking somata under Poisson noise,
128×128 px) is converted, then trained on with each setting for the same number of optimiser
steps, seed 0. Each model denoises the held-out last 32 frames; reported: PSNR of that output
against the noise-free recording (dB), the raw recording's PSNR for reference, the final
validation loss and the wall time. CPU-only machines: the network is reduced to --features.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import machine

from deepcad_chunked import TrainConfig, convert, load_model, train

SETTINGS = [
    ("DeepCAD-RT code: lr 1e-5, betas (0.5, 0.999)", {"lr": 1e-5, "betas": (0.5, 0.999)}),
    ("DeepCAD paper: lr 5e-5, betas (0.5, 0.9)", {"lr": 5e-5, "betas": (0.5, 0.9)}),
    ("lr 1e-4, betas (0.5, 0.999)", {"lr": 1e-4, "betas": (0.5, 0.999)}),
    ("lr 3e-4, betas (0.5, 0.999)", {"lr": 3e-4, "betas": (0.5, 0.999)}),
    ("lr 1e-3, betas (0.5, 0.999)", {"lr": 1e-3, "betas": (0.5, 0.999)}),
    ("lr 1e-4, betas (0.9, 0.999)", {"lr": 1e-4, "betas": (0.9, 0.999)}),
    ("lr 1e-4, batch 1", {"lr": 1e-4, "batch_size": 1}),
    ("lr 1e-4, batch 4", {"lr": 1e-4, "batch_size": 4}),
    ("lr 1e-4, patch 8,64,64", {"lr": 1e-4, "patch": (8, 64, 64)}),
    ("lr 3e-4, patch 32,64,64", {"lr": 3e-4, "patch": (32, 64, 64)}),
    ("lr 3e-4, patch 16,96,96", {"lr": 3e-4, "patch": (16, 96, 96)}),
    ("lr 1e-4, independent tiles (1 per window)", {"lr": 1e-4, "tiles_per_window": 1}),
    ("lr 1e-4, 16 tiles per window", {"lr": 1e-4, "tiles_per_window": 16}),
]


def simulate(frames: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy uint16, clean float) recordings: somata with calcium transients, Poisson noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    clean = np.full((frames, size, size), 2.0)
    kernel = np.exp(-np.arange(90) / 20.0) - np.exp(-np.arange(90) / 2.0)
    for _ in range(size * size // 300):
        cy, cx, r = *rng.uniform(0, size, 2), rng.uniform(3, 6)
        ring = np.exp(-((np.hypot(yy - cy, xx - cx) - r * 0.6) ** 2) / (r * 0.5) ** 2)
        spikes = (rng.random(frames) < 0.03).astype(float)
        trace = 1.0 + 6.0 * np.convolve(spikes, kernel)[:frames]
        clean += rng.uniform(1.0, 3.0) * trace[:, None, None] * ring[None]
    return rng.poisson(clean).astype(np.uint16), clean


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, peak = the truth's range."""
    mse = float(np.mean((estimate - truth) ** 2))
    return 10 * np.log10(float(truth.max() - truth.min()) ** 2 / mse)


def main() -> None:
    """Train with every setting and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    noisy, clean = simulate(args.frames, 128)
    tifffile.imwrite(work / "sim.tif", noisy, photometric="minisblack")
    rec = convert(work / "sim.tif", work / "sim.zarr", workers=1, progress=False)
    held = slice(args.frames - 32, args.frames)
    truth = clean[held]
    print(f"# machine: {machine()}; torch threads {torch.get_num_threads()}")
    raw_psnr = psnr(noisy[held].astype(float), truth)
    print(f"# simulated {noisy.shape}, mean {noisy.mean():.2f} photons/px; {args.steps} steps, "
          f"f = {args.features}, patch 16,64,64, batch 2 and the default tiles per window "
          f"unless said; raw PSNR of the held-out frames {raw_psnr:.2f} dB\n")
    print("| setting | PSNR dB (held-out) | final validation loss | minutes |")
    print("|---|---|---|---|")
    chosen = [SETTINGS[i] for i in args.only] if args.only else SETTINGS
    for name, overrides in chosen:
        options = {"patch": (16, 64, 64), "batch_size": 2, "features": args.features,
                   "epochs": 3, "steps_per_epoch": args.steps // 3, "workers": 1,
                   "device": "cpu", "val_tiles": 4, **overrides}
        t0 = time.perf_counter()
        run = work / f"run{len(name)}"
        result = train(rec.path, run, config=TrainConfig(**options), progress=False)
        minutes = (time.perf_counter() - t0) / 60
        model = load_model(result.last)
        norm = model.normalization
        x = (torch.from_numpy(noisy[held].astype(np.float32)) - norm["mean"]) / norm["std"]
        with torch.no_grad():
            out = model(x[None, None])[0, 0].numpy() * norm["std"] + norm["mean"]
        print(f"| {name} | {psnr(out, truth):.2f} | {result.history[-1]['val_loss']:.4f} | "
              f"{minutes:.1f} |", flush=True)
        shutil.rmtree(run)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
