"""Does the held-out frame score rank methods as the truth does? A check on simulations.

Usage: python benchmarks/heldout.py [--frames 1200] [--size 128] [--photons 1] [--steps 600]

A network (the demo's settings, ``--steps`` steps) is trained on one simulation (seed 1) and
scores a second one (seed 2) it never saw. Printed side by side for the network, the raw frames
and the six Gaussian filters: the held-out MSE and excess (``heldout_score``, no ground truth
used), the true error of the same half-rate estimates at the odd frames (with the truth), and
the true SNR of each method on the whole recording at the full frame rate (``metrics.score``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import tifffile
from _common import denoise_in_memory, machine

from deepcad_chunked import convert, train
from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.heldout import heldout_score
from deepcad_chunked.jobs.run import DEMO_TRAINING
from deepcad_chunked.metrics import score
from deepcad_chunked.simulate import simulate


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--photons", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-heldout-"))
    try:
        sim = SimulationConfig(frames=args.frames, size=(args.size, args.size),
                               photons=args.photons)
        a = simulate(work / "a", sim.model_copy(update={"seed": 1}))
        b = simulate(work / "b", sim.model_copy(update={"seed": 2}))
        rec = convert(a.raw, work / "a.zarr", workers=1, progress=False).path
        config = DEMO_TRAINING.model_copy(update={"epochs": 1, "steps_per_epoch": args.steps,
                                                  "device": "cpu"})
        model = train(rec, work / "run", config=config, progress=False).last
        out = work / "denoised.tif"
        tifffile.imwrite(out, denoise_in_memory(model, tifffile.imread(b.raw)))
        truth = {r["name"]: r["snr_db"] for r in score(out, b.clean, b.raw)["rows"]}
        held = heldout_score(b.raw, model=model, truth=b.clean, device="cpu")
        print(f"# machine: {machine()}")
        print(f"# {args.frames}×{args.size}² px, {args.photons:g} photon/px/frame; network "
              f"trained on seed 1 ({args.steps} steps of the demo's settings), scored on seed 2 "
              f"({held['pairs']} odd frames)\n")
        print("| method | held-out MSE | excess (no truth) | true excess (half rate) | "
              "true SNR dB (full rate) |")
        print("|---|---|---|---|---|")
        best = held["rows"][0]["true_mse"]
        for row in held["rows"]:
            print(f"| {row['name']} | {row['mse']:.3f} | {row['excess']:.3f} | "
                  f"{row['true_mse'] - best:.3f} | {truth[row['name']]:.2f} |")
        held_order = [r["name"] for r in held["rows"]]
        true_order = sorted(truth, key=lambda n: -truth[n])
        print(f"\nheld-out ranking {'equals' if held_order == true_order else 'differs from'} "
              "the ranking by true SNR at the full rate")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
