"""Training that gets there sooner: settings compared at the same wall time.

Usage: python benchmarks/train_budget.py [--seconds 150] [--only 0 3 5] [--photons 1]

The demo's recording (``simulate``: 1200 frames of 128×128 px, 1 photon/px/frame, seed 0) is
converted once. Every setting then trains (seed 0, on this machine's CPU, as ``demo`` does)
for the same wall time: a short run measures its seconds per step, and the run proper gets as
many steps as fit in ``--seconds``. Each model denoises the whole recording (in memory, by
exact pieces of frames) and is scored against the ground truth with ``metrics.score``: SNR,
the best (oracle-tuned) 3D Gaussian filter's SNR, and the mean trace correlation.
Prints a Markdown table; the training minutes column shows the budgets really were equal.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tifffile
from _common import demo_recording, denoise_in_memory, machine, train_for

from deepcad_chunked.metrics import score

#: The demo's training before this benchmark (f = 8, constant lr 3e-4, DeepCAD's L1+L2 loss).
BASE: dict[str, Any] = {"features": 8, "lr": 3e-4, "schedule": "constant", "loss": "l1+l2",
                        "bypass": None}
#: The base with the mean squared error as the loss.
L2: dict[str, Any] = {**BASE, "loss": "l2"}
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("before: constant lr 3e-4, L1+L2, f 8", BASE),
    ("cosine lr 3e-4 (5 % warm-up)", {**BASE, "schedule": "cosine"}),
    ("cosine lr 1e-3", {**BASE, "schedule": "cosine", "lr": 1e-3}),
    ("constant lr 3e-4, L2 loss", L2),
    ("cosine lr 1e-3, L2", {**L2, "schedule": "cosine", "lr": 1e-3}),
    ("cosine lr 3e-4, L2", {**L2, "schedule": "cosine"}),
    ("constant lr 1e-3, L2", {**L2, "lr": 1e-3}),
    ("constant lr 3e-4, L2, f 4", {**L2, "features": 4}),
    ("constant lr 3e-4, L2, f 16", {**L2, "features": 16}),
    ("constant lr 3e-4, L2, 8 tiles per window", {**L2, "tiles_per_window": 8}),
    ("constant lr 3e-4, L2, batch 4", {**L2, "batch_size": 4}),
    ("constant lr 3e-4, L2, patch 32,64,64 (64-frame tiles)", {**L2, "patch": (32, 64, 64)}),
    ("constant lr 3e-4, L2, patch 16,32,32, batch 8", {**L2, "patch": (16, 32, 32),
                                                        "batch_size": 8}),
    ("constant lr 3e-4, L1+L2, f 16", {**BASE, "features": 16}),
    ("constant lr 3e-4, L2, f 16, seed 1 (run-to-run spread)", {**L2, "features": 16,
                                                                "seed": 1}),
    ("constant lr 3e-4, L2, f 32", {**L2, "features": 32}),
    ("before + weight average 0.99", {**BASE, "average": 0.99}),
    ("constant lr 3e-4, L2, f 16, weight average 0.99", {**L2, "features": 16,
                                                         "average": 0.99}),
    ("the same, seed 1", {**L2, "features": 16, "average": 0.99, "seed": 1}),
    ("row 17 + linear bypass 13,7,7", {**L2, "features": 16, "average": 0.99,
                                       "bypass": (13, 7, 7)}),
    ("row 17 + linear bypass, seed 1", {**L2, "features": 16, "average": 0.99,
                                        "bypass": (13, 7, 7), "seed": 1}),
    ("before + linear bypass (the new defaults at f 8)", {**BASE, "bypass": (13, 7, 7)}),
    ("the same, seed 1", {**BASE, "bypass": (13, 7, 7), "seed": 1}),
]


def main() -> None:
    """Train with every setting for the same wall time and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--photons", type=float, default=1.0)
    parser.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    try:
        files, rec, raw = demo_recording(work, args.photons)
        print(f"# machine: {machine()}")
        print(f"# demo recording (1200×128², {args.photons:g} photon/px/frame); "
              f"{args.seconds:.0f} s of training per setting, 2 loader workers, seed 0\n")
        print("| # | setting | steps | training min | SNR dB | best Gaussian dB | "
              "ours − Gaussian dB | trace r |")
        print("|---|---|---|---|---|---|---|---|")
        chosen = args.only if args.only else range(len(SETTINGS))
        for i in chosen:
            name, options = SETTINGS[i]
            run = work / f"run{i}"
            last, steps, minutes = train_for(rec, run, options, args.seconds)
            out = work / f"denoised{i}.tif"
            tifffile.imwrite(out, denoise_in_memory(last, raw), photometric="minisblack")
            s = score(out, files.clean, files.raw, footprints=files.truth)
            ours = s["rows"][0]
            gauss = next(r for r in s["rows"] if r["name"] == s["best_gaussian"])
            print(f"| {i} | {name} | {steps} | {minutes:.1f} | {ours['snr_db']:.2f} | "
                  f"{gauss['snr_db']:.2f} | {s['gain_over_gaussian_db']:+.2f} | "
                  f"{ours['trace_r_mean']:.3f} |", flush=True)
            shutil.rmtree(run)
            out.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
