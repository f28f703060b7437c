"""Downstream: Suite2p's neuron detection on raw, Gaussian-filtered and denoised simulations.

Usage: python benchmarks/detection.py [--photons 0.3 1] [--frames 1200] [--size 128]
       [--iou 0.5] [--thresholds 1] [--half-rate] [--scene somata|dense]
       [--indicator fast|slow] [--subtract-offset] [--pure-noise] [--loss l2|l1+l2]
       [--no-calibrate] [--record]
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
smoothed by a Gaussian of one frame; a spike compared in the frame where its fluorescence first
shows, ``simulate.SPIKE_LAG``). Transients (``detection.transient_dynamics``): the
median over neurons of the ratio of each movie's transient peaks to the noise-free movie's,
and the error of the population transient's rise and decay times. With ``--pure-noise``, the
same pipeline on a movie of noise alone (a flat field at the photon level): the ROIs Suite2p
finds in it raw and denoised (none are there). Prints a Markdown table.
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
from _common import machine, parity_streams, publish
from scipy import ndimage

from deepcad_chunked.config import DenoiseConfig, SimulationConfig, TrainConfig
from deepcad_chunked.detection import (
    footprint_masks,
    footprint_traces,
    match,
    oasis_spikes,
    spike_correlation,
    suite2p_rois,
    transient_dynamics,
)
from deepcad_chunked.jobs.run import DEMO_TRAINING, run
from deepcad_chunked.metrics import Frames, score
from deepcad_chunked.simulate import SPIKE_LAG, load_truth, simulate, spike_counts


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
    parser.add_argument("--scene", choices=("somata", "dense"), default="somata")
    parser.add_argument("--indicator", choices=("fast", "slow"), default="fast")
    parser.add_argument("--subtract-offset", action="store_true",
                        help="offset-subtracted samples clipped at zero, 0.5 %% line dropouts")
    parser.add_argument("--pure-noise", action="store_true",
                        help="also count the ROIs found in a movie of noise alone")
    parser.add_argument("--loss", choices=("l2", "l1+l2"), default=DEMO_TRAINING.loss,
                        help="training loss (an ablation; default the demo's)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="leave out the intensity calibration (an ablation)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    training = DEMO_TRAINING.model_copy(update={"loss": args.loss,
                                                "calibrate": not args.no_calibrate})
    logging.basicConfig(level=logging.WARNING)
    t = training
    lines = [f"machine: {machine()}; {args.frames} frames of {args.size}² px at 30 Hz, seed 0, "
             f"{args.scene} scene, {args.indicator} indicator"
             + (", offset-subtracted and clipped at zero" if args.subtract_offset else "")
             + f"; training: the demo's (f = {t.features}, {t.epochs} × {t.steps_per_epoch} "
             f"steps, lr {t.lr:g} {t.schedule}, loss {t.loss}, bypass {t.bypass}, intensity "
             f"calibration {t.calibrate}); Suite2p sparsery, diameter {args.diameter:g} px; "
             f"IoU ≥ {args.iou:g}; amplitude: median ratio of transient peaks to the "
             "noise-free movie's; rise, decay: error of the population transient's times",
             "",
             "| photons/px/frame | recording | SNR dB | threshold scaling | ROIs found | hits | "
             "precision | recall | F1 | mean IoU of hits | spike r | amplitude | rise ms | "
             "decay ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-detection-"))
    try:
        for photons in args.photons:
            config = SimulationConfig(
                frames=args.frames, size=(args.size, args.size), photons=photons, seed=0,
                scene=args.scene, indicator=args.indicator,
                subtract_offset=args.subtract_offset,
                dropouts=0.005 if args.subtract_offset else 0.0)
            files = simulate(work / f"p{photons}", config)
            t0 = time.perf_counter()
            out = run(files.raw, work / f"run{photons}", train_config=training,
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
            clean = tifffile.imread(files.clean)
            movies["noise-free (ceiling)"] = (clean, float("inf"))
            truth = load_truth(files.truth)
            somata = truth.somata
            true = footprint_masks(somata, raw.shape[1:])
            kinds = (truth.kinds if truth.kinds is not None
                     else np.zeros(len(truth.footprints), np.int8))
            spikes = spike_counts(truth.config).T[kinds == 0]  # the somata's
            for name, (movie, db) in movies.items():
                tried = [(match(suite2p_rois(movie, frame_rate=30.0, diameter=args.diameter,
                                             settings={"threshold_scaling": k}), true,
                                iou=args.iou), k) for k in args.thresholds]
                d, k = max(tried, key=lambda pair: pair[0].f1)
                inferred = oasis_spikes(footprint_traces(movie, somata), frame_rate=30.0,
                                        window_s=10.0)
                r = float(np.nanmean(spike_correlation(inferred, spikes, lag=SPIKE_LAG)))
                dyn = transient_dynamics(movie, clean, somata, spikes, frame_rate=30.0,
                                         offset=config.baseline)
                lines.append(
                    f"| {photons:g} | {name} | {db:.2f} | {k:g} | {d.found} | "
                    f"{d.hits}/{d.true} | {d.precision:.2f} | {d.recall:.2f} | {d.f1:.2f} | "
                    f"{d.mean_iou:.2f} | {r:.3f} | {np.median(dyn.amplitude_ratio):.3f} | "
                    f"{dyn.rise_error_ms:+.0f} | {dyn.decay_error_ms:+.0f} |")
                print(lines[-1], flush=True)
            if args.pure_noise:
                lines.append(_pure_noise(work, config, training, args))
                print(lines[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish(f"Downstream: detection, spikes and transients ({args.scene} scene, "
            f"{args.indicator} indicator" + (", clipped at zero" if args.subtract_offset else "")
            + ")", "\n".join(lines), args.record)


def _pure_noise(work: Path, config: SimulationConfig, training: TrainConfig,
                args: argparse.Namespace) -> str:
    """The pipeline on noise alone: the ROIs Suite2p finds raw and denoised (a table row)."""
    rng = np.random.default_rng(11)
    shape = (config.frames, *config.size)
    level = config.photons
    raw = config.offset * (not config.subtract_offset) + config.gain * rng.poisson(level, shape)
    raw = np.clip(np.round(raw + rng.normal(0, config.read_noise, shape)), 0, 65535)
    path = work / f"noise{level:g}.tif"  # one recording and run per photon level
    tifffile.imwrite(path, raw.astype(np.uint16), photometric="minisblack")
    out = run(path, work / f"noise{level:g}-run", train_config=training,
              denoise_config=DenoiseConfig(dtype="float32"), workers=args.workers,
              progress=False)
    denoised = Frames(out.denoised).read(0, config.frames).astype(np.float32)
    found = {name: len(suite2p_rois(movie.astype(np.float32), frame_rate=30.0,
                                    diameter=args.diameter))
             for name, movie in (("raw", raw), ("denoised", denoised))}
    return (f"| {level:g} | pure noise (no cells): ROIs found raw {found['raw']}, denoised "
            f"{found['denoised']} | | | | | | | | | | | | |")


if __name__ == "__main__":
    main()
