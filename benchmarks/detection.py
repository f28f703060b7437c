"""Downstream: Suite2p's neuron detection on raw, Gaussian-filtered and denoised simulations.

Usage: python benchmarks/detection.py [--photons 0.3 1] [--frames 1200] [--size 128]
       [--iou 0.5] [--thresholds 1] [--half-rate]
       (needs the [eval] extra: pip install 'deepcad-chunked[eval]')

For each photon level: ``simulate`` (seed 0) → ``run`` with the demo's training budget (convert,
train, denoise on a LocalCluster, float32 output) → the best 3D Gaussian filter (chosen by its
SNR against the ground truth: an oracle-tuned baseline) → Suite2p's cell detection (default
``sparsery`` settings, diameter 10 px, tau 0.7 s) on the raw, Gaussian-filtered, denoised and
noise-free recordings → each set of ROIs matched one to one with the simulated footprints
(pixels above 20 % of their peak): precision, recall and F1 at IoU ≥ --iou. The noise-free
recording is the ceiling the detector reaches on this simulation. With several
``--thresholds`` (Suite2p's ``threshold_scaling``), each recording is scored with the one that
gives it the best F1 (tuned against the truth, as the Gaussian is). Spike inference, on the
true footprints so that it scores the traces and not the detector: each neuron's
footprint-weighted trace → Suite2p's baseline and OASIS deconvolution (tau 0.7 s, a 10 s
baseline window) → the mean over neurons of the correlation with the simulated spikes (both
smoothed by a Gaussian of one frame). Prints a Markdown table.
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
from _common import machine, parity_streams
from scipy import ndimage

from deepcad_chunked.config import DenoiseConfig, SimulationConfig
from deepcad_chunked.detection import (
    footprint_masks,
    footprint_traces,
    match,
    oasis_spikes,
    spike_correlation,
    suite2p_rois,
)
from deepcad_chunked.jobs.run import DEMO_TRAINING, run
from deepcad_chunked.metrics import Frames, score
from deepcad_chunked.simulate import load_truth, simulate, spike_counts


def main() -> None:
    """Print the detection table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--diameter", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--half-rate", action="store_true",
                        help="also score the denoised recording averaged with the network's "
                        "pass over the even and odd frames as half-rate streams (parity.py)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.0],
                        help="Suite2p threshold_scaling values; the best F1 is kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t = DEMO_TRAINING
    print(f"# machine: {machine()}")
    print(f"# {args.frames} frames of {args.size}² px at 30 Hz, seed 0; training: the demo's "
          f"(f = {t.features}, {t.epochs} × {t.steps_per_epoch} steps, lr {t.lr:g} {t.schedule}, "
          f"loss {t.loss}, bypass {t.bypass}); Suite2p sparsery, diameter {args.diameter:g} px; "
          f"IoU ≥ {args.iou:g}")
    print("\n| photons/px/frame | recording | SNR dB | threshold scaling | ROIs found | hits | "
          "precision | recall | F1 | mean IoU of hits | spike r |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="bench-detection-"))
    try:
        for photons in args.photons:
            files = simulate(work / f"p{photons}", SimulationConfig(
                frames=args.frames, size=(args.size, args.size), photons=photons, seed=0))
            t0 = time.perf_counter()
            out = run(files.raw, work / f"run{photons}", train_config=DEMO_TRAINING,
                      denoise_config=DenoiseConfig(dtype="float32"), workers=args.workers,
                      progress=False)
            minutes = (time.perf_counter() - t0) / 60
            s = score(out.denoised, files.clean, files.raw, footprints=files.truth)
            snr = {r["name"]: r["snr_db"] for r in s["rows"]}
            best = s["best_gaussian"]
            sigma = [float(v.split("=")[1]) for v in best.removeprefix("gaussian ").split()]
            raw = tifffile.imread(files.raw).astype(np.float32)
            denoised = Frames(out.denoised).read(0, args.frames).astype(np.float32)
            movies = {
                "raw": (raw, snr["raw"]),
                f"Gaussian ({best.removeprefix('gaussian ')})": (
                    ndimage.gaussian_filter(raw, (sigma[0], sigma[1], sigma[1]),
                                            mode="reflect"), snr[best]),
                f"denoised ({minutes:.1f} min)": (denoised, snr["denoised"]),
            }
            if args.half_rate:
                mean = (denoised + parity_streams(out.model, raw)) / 2
                tifffile.imwrite(work / "mean.tif", mean, photometric="minisblack")
                db = score(work / "mean.tif", files.clean, footprints=files.truth)["rows"][0]
                movies["denoised, mean with half-rate streams"] = (mean, db["snr_db"])
            movies["noise-free (ceiling)"] = (tifffile.imread(files.clean), float("inf"))
            truth = load_truth(files.truth)
            true = footprint_masks(truth.footprints, raw.shape[1:])
            spikes = spike_counts(truth.config).T
            for name, (movie, db) in movies.items():
                tried = [(match(suite2p_rois(movie, frame_rate=30.0, diameter=args.diameter,
                                             settings={"threshold_scaling": k}), true,
                                iou=args.iou), k) for k in args.thresholds]
                d, k = max(tried, key=lambda pair: pair[0].f1)
                inferred = oasis_spikes(footprint_traces(movie, truth.footprints),
                                        frame_rate=30.0, window_s=10.0)
                r = float(np.nanmean(spike_correlation(inferred, spikes)))
                print(f"| {photons:g} | {name} | {db:.2f} | {k:g} | {d.found} | "
                      f"{d.hits}/{d.true} | "
                      f"{d.precision:.2f} | {d.recall:.2f} | {d.f1:.2f} | {d.mean_iou:.2f} | "
                      f"{r:.3f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
