"""Inference at the rate the network trained at: full-rate stream against even/odd streams.

Usage: python benchmarks/parity.py [--seconds 150] [--seeds 0 1] [--photons 1]

DeepCAD trains on half-rate stacks (even frames in, odd frames as the target) but denoises the
recording as one full-rate stream, so at inference the network sees its input's dynamics twice
as slow as in training. This benchmark trains on the demo's recording (as ``train_budget.py``
does, for the same wall time per setting) and denoises the whole recording three ways: as one
stream (what ``denoise`` does), as two half-rate streams (even frames alone, odd frames alone,
interleaved back), and the mean of the two; and, to tell the half rate's part from that of any
two-pass ensemble, the mean of the full-rate pass and one over the recording mirrored in t, y
and x (mirrored back). Each is scored against the ground truth (SNR, mean trace correlation)
beside the best oracle-tuned 3D Gaussian. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tifffile
from _common import demo_recording, denoise_in_memory, machine, parity_streams, train_for

from deepcad_chunked.metrics import score

#: Trained settings: the demo's, and DeepCAD-RT's network (no bypass) at the same budget.
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("demo's training (f 8, L2, average, bypass)", {"features": 8, "loss": "l2",
                                                     "average": 0.99}),
    ("no bypass (f 8, L2, average)", {"features": 8, "loss": "l2", "average": 0.99,
                                      "bypass": None}),
]


def main() -> None:
    """Train each setting per seed, denoise three ways and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--photons", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    try:
        files, rec, raw = demo_recording(work, args.photons)
        baseline = score(files.raw, files.clean, files.raw, footprints=files.truth)
        gauss = next(r for r in baseline["rows"] if r["name"] == baseline["best_gaussian"])
        print(f"# machine: {machine()}")
        print(f"# demo recording (1200×128², {args.photons:g} photon/px/frame); "
              f"{args.seconds:.0f} s of training per setting and training seed\n")
        print("| setting | seed | best Gaussian dB | full-rate dB | half-rate dB | "
              "mean of both dB | mean with mirrored dB | trace r (same order) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, options in SETTINGS:
            for seed in args.seeds:
                run = work / "run"
                last, _, _ = train_for(rec, run, {**options, "seed": seed}, args.seconds)
                full = denoise_in_memory(last, raw)
                half = parity_streams(last, raw)
                mirrored = denoise_in_memory(last, raw[::-1, ::-1, ::-1])[::-1, ::-1, ::-1]
                snr, trace = [], []
                for est in (full, half, (full + half) / 2, (full + mirrored) / 2):
                    out = work / "denoised.tif"
                    tifffile.imwrite(out, est, photometric="minisblack")
                    s = score(out, files.clean, footprints=files.truth)
                    snr.append(s["rows"][0]["snr_db"])
                    trace.append(s["rows"][0]["trace_r_mean"])
                print(f"| {name} | {seed} | {gauss['snr_db']:.2f} | {snr[0]:.2f} | "
                      f"{snr[1]:.2f} | {snr[2]:.2f} | {snr[3]:.2f} | "
                      f"{' / '.join(f'{r:.3f}' for r in trace)} |", flush=True)
                shutil.rmtree(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
