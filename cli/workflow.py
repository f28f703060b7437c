"""Commands of the whole job: simulate, run, demo, evaluate and preview."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from deepcad_chunked.cli.options import (
    SOURCES_HELP,
    add_cluster_options,
    add_source_options,
    add_training_options,
    cluster_of,
    pair,
    region,
    source_options,
    span,
    training_config,
)

log = logging.getLogger("deepcad_chunked.cli")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register simulate, run, demo, evaluate and preview."""
    _add_simulate(sub)
    _add_run(sub)
    _add_demo(sub)
    _add_evaluate(sub)
    _add_preview(sub)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from deepcad_chunked.config import SimulationConfig as C

    d = C()
    p = sub.add_parser("simulate", help="write a synthetic recording with ground truth",
                       description="A two-photon calcium recording with ground truth: somata "
                       "with ring-like footprints, bursting spike trains with GCaMP6f "
                       "kinetics, neuropil, vessels, Poisson–Gaussian noise. Writes PREFIX.tif "
                       "(noisy uint16), PREFIX_clean.tif, PREFIX_truth.npz and "
                       "PREFIX_traces.npy, chunk by chunk (any length).")
    p.add_argument("-o", "--output", metavar="PREFIX", help="path prefix")
    p.add_argument("--acquire", metavar="DIR", help="instead: write the noisy frames into DIR "
                   "in real time, as a microscope does (file_00001.tif, …, the newest growing "
                   "page by page), for follow")
    p.add_argument("--rate", type=float, metavar="HZ",
                   help="with --acquire: frames written per second (default --frame-rate)")
    p.add_argument("--frames-per-file", type=int, default=500, metavar="N",
                   help="with --acquire: frames per file (default 500)")
    p.add_argument("--stop", action="store_true",
                   help="with --acquire: write DIR/STOP after the last frame")
    p.add_argument("--frames", type=int, help=f"frames (default {d.frames})")
    p.add_argument("--size", type=pair, metavar="Y,X",
                   help=f"frame size (default {d.size[0]},{d.size[1]})")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--photons", type=float,
                   help=f"mean photons per pixel per frame (default {d.photons:g})")
    p.add_argument("--frame-rate", type=float, help=f"Hz (default {d.frame_rate:g})")
    p.add_argument("--neurons", type=int, help="somata (default: one per 600 µm²)")
    p.add_argument("--gain", type=float, help=f"ADU per photon (default {d.gain:g})")
    p.add_argument("--offset", type=float, help=f"baseline ADU (default {d.offset:g})")
    p.add_argument("--read-noise", type=float, help=f"ADU σ (default {d.read_noise:g})")
    p.add_argument("--subtract-offset", action="store_true", default=None,
                   help="store samples with the baseline subtracted and negatives clipped to "
                   "zero, as many microscopes' software does")
    p.add_argument("--dropouts", type=float, metavar="P",
                   help="probability that a line of a frame reads zeros (default 0)")
    p.add_argument("--scene", choices=("somata", "dense"), help="somata: separate round "
                   "cells over smooth neuropil (default); dense: packed irregular somata, thin "
                   "active dendrites and axons, textured neuropil with its own fluctuations, "
                   "bleaching and motion jitter")
    p.add_argument("--indicator", choices=("fast", "slow"),
                   help="calcium kinetics: GCaMP6f-like (default) or GCaMP6s-like")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(run=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    from deepcad_chunked.config import SimulationConfig
    from deepcad_chunked.errors import ConfigError
    from deepcad_chunked.simulate import simulate

    given = {k: getattr(args, k) for k in ("frames", "size", "seed", "photons", "frame_rate",
                                           "neurons", "gain", "offset", "read_noise",
                                           "subtract_offset", "dropouts", "scene",
                                           "indicator")}
    config = SimulationConfig.build(**{k: v for k, v in given.items() if v is not None})
    if (args.output is None) == (args.acquire is None):
        raise ConfigError("give either -o PREFIX (files with ground truth) or --acquire DIR "
                          "(frames written in real time)")
    if args.acquire is not None:
        from deepcad_chunked.acquire import acquire

        written = acquire(args.acquire, config, rate=args.rate,
                          frames_per_file=args.frames_per_file, stop=args.stop)
        log.info("wrote %d frames into %s", written, args.acquire)
        return 0
    files = simulate(args.output, config, overwrite=args.overwrite)
    log.info("wrote %s (noisy), %s, %s and %s", files.raw, files.clean.name, files.truth.name,
             files.traces.name)
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="convert, train and denoise in one command",
                       description="Convert the recording, train the denoiser on it and "
                       "denoise it, into OUTDIR (recording.zarr, model/, denoised.zarr, and "
                       "denoised.ome.tif with --export). Rerunning carries on where an "
                       "interrupted run stopped.")
    p.add_argument("sources", nargs="+", metavar="SRC", help=SOURCES_HELP)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder to fill")
    add_source_options(p)
    add_training_options(p)
    p.add_argument("--dtype", choices=("same", "float32"),
                   help="denoised samples: the input's dtype (default) or float32")
    p.add_argument("--export", action="store_true", help="also write denoised.ome.tif")
    p.add_argument("--overwrite", action="store_true",
                   help="start again (removes this command's products in OUTDIR only)")
    add_cluster_options(p)
    p.set_defaults(run=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from deepcad_chunked.config import ConvertConfig, DenoiseConfig
    from deepcad_chunked.jobs.run import run

    denoise = DenoiseConfig.build(**({"dtype": args.dtype} if args.dtype else {}))
    recording = ConvertConfig.build(**source_options(args))
    with cluster_of(args) as cluster:
        result = run(args.sources, args.output, train_config=training_config(args),
                     convert_config=recording,
                     denoise_config=denoise, export_tiff=args.export, cluster=cluster,
                     workers=args.workers, progress=False if args.no_progress else None,
                     overwrite=args.overwrite)
    log.info("denoised recording: %s (model %s)", result.denoised, result.model)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from deepcad_chunked.jobs.run import DEMO_SIMULATION as S
    from deepcad_chunked.jobs.run import DEMO_TRAINING as T

    p = sub.add_parser("demo", help="simulate, denoise, evaluate and draw a report",
                       description="Simulate a small recording with ground truth "
                       f"({S.frames} frames of {S.size[0]}×{S.size[1]} px, {S.photons:g} "
                       f"photons per pixel), run the whole pipeline on it (f = {T.features}, "
                       f"{T.epochs} × {T.steps_per_epoch} steps), print the SNR before and "
                       "after and write report.png. A few minutes on a laptop CPU.")
    p.add_argument("-o", "--output", default="deepcad-demo", metavar="DIR",
                   help="folder (default ./deepcad-demo)")
    p.add_argument("--frames", type=int, help=f"simulated frames (default {S.frames})")
    p.add_argument("--size", type=pair, metavar="Y,X", help="simulated frame size")
    p.add_argument("--photons", type=float, help=f"photon level (default {S.photons:g})")
    add_training_options(p, T)
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--overwrite", action="store_true", help="start again")
    add_cluster_options(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from deepcad_chunked.config import SimulationConfig
    from deepcad_chunked.jobs.run import DEMO_SIMULATION, DEMO_TRAINING, demo

    sim = DEMO_SIMULATION.model_dump()
    sim.update({k: v for k, v in (("frames", args.frames), ("size", args.size),
                                  ("photons", args.photons)) if v is not None})
    with cluster_of(args) as cluster:
        scores = demo(args.output, simulation=SimulationConfig.build(**sim),
                      training=training_config(args, DEMO_TRAINING), cluster=cluster,
                      workers=args.workers, progress=False if args.no_progress else None,
                      overwrite=args.overwrite)
    _print_scores(scores, args.json)
    log.info("report: %s", scores["report"])
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a denoised recording",
                       description="With --truth: SNR and PSNR (dB), the gain over --raw, the "
                       "Pearson correlation of each neuron's trace with its clean trace "
                       "(footprints from a simulation's _truth.npz) and the best of a few 3D "
                       "Gaussian filters as a baseline. Without ground truth, given --raw: the "
                       "held-out frame score (the even frames denoised alone by the network "
                       "and by Gaussian filters, each compared with the odd frames none of "
                       "them saw: differences estimate differences in true error) and the "
                       "temporal standard deviation over a dark region. Given --raw, always: "
                       "the intensity check (denoised over raw temporal mean, by decile of "
                       "brightness). Recordings are Zarr stores or source files.")
    p.add_argument("denoised", metavar="DENOISED", help="denoised recording")
    p.add_argument("--truth", metavar="CLEAN", help="noise-free recording")
    p.add_argument("--raw", metavar="RAW", help="the noisy recording")
    p.add_argument("--footprints", metavar="TRUTH.npz",
                   help="neuron footprints and detector offset (default: PREFIX_truth.npz "
                   "beside PREFIX_clean.tif)")
    p.add_argument("--offset", type=float, metavar="VALUE", help="detector baseline of the "
                   "clean recording, removed before the SNR's signal power (default: the "
                   "simulation's, from --footprints)")
    p.add_argument("--dark", type=region, metavar="Y0:Y1,X0:X1",
                   help="dark region for the no-ground-truth score (default: found)")
    p.add_argument("--model", metavar="MODEL.pt", help="network of the held-out score "
                   "(default: the one that made DENOISED, named in its attributes)")
    p.add_argument("--frames", type=span, metavar="START:STOP", help="frames of the held-out "
                   "score (default: those the model's training held out, when RAW is what "
                   "it trained on; else all)")
    p.add_argument("--held-out", action="store_true",
                   help="with --truth: also the held-out score, beside each method's true error")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the held-out score runs the network (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from deepcad_chunked.errors import ConfigError
    from deepcad_chunked.heldout import heldout_score, network_of
    from deepcad_chunked.metrics import dark_region_std, intensity_bands, score

    if args.held_out and not args.raw:
        raise ConfigError("--held-out needs --raw (the noisy recording)")
    scores: dict[str, Any] = {}
    if args.truth:
        scores = score(args.denoised, args.truth, args.raw, footprints=args.footprints,
                       offset=args.offset)
    else:
        scores["dark"] = dark_region_std(args.denoised, args.raw, region=args.dark)
    if args.raw and (args.held_out or not args.truth):
        model, source = network_of(args.denoised, args.model)
        scores["held_out"] = heldout_score(args.raw, model=model, frames=args.frames,
                                           device=args.device, recording_store=source,
                                           truth=args.truth)
    if args.raw:
        scores["intensity"] = intensity_bands(args.denoised, args.raw)
    _print_scores(scores, args.json)
    return 0


def _print_scores(scores: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(scores, indent=2, ensure_ascii=False))
        return
    if "rows" in scores:
        print(f"{'':32} {'SNR dB':>8} {'PSNR dB':>8} {'trace r':>8}")
        for row in scores["rows"]:
            r = row["trace_r_mean"]
            print(f"{row['name']:32} {row['snr_db']:8.2f} {row['psnr_db']:8.2f} "
                  f"{'' if r is None else f'{r:.3f}':>8}")
        if "gain_db" in scores:
            print(f"SNR gain over raw: {scores['gain_db']:+.2f} dB; over the best Gaussian "
                  f"({scores['best_gaussian']}): {scores['gain_over_gaussian_db']:+.2f} dB")
    if "held_out" in scores:
        held = scores["held_out"]
        print(f"held-out frame score, {held['why']} ({held['pairs']} odd frames), best first:")
        truth = "true_mse" in held["rows"][0]
        print(f"{'':32} {'held-out MSE':>12} {'excess':>10} {'gap dB':>7}"
              + (f" {'true MSE':>10}" if truth else ""))
        for row in held["rows"]:
            print(f"{row['name']:32} {row['mse']:12.4g} {row['excess']:10.4g} "
                  f"{row['gap_db']:7.2f}" + (f" {row['true_mse']:10.4g}" if truth else ""))
        print("excess: how much larger than the best's its true mean squared error is "
              "estimated to be; gap dB: at least this much worse")
    if "dark" in scores:
        dark = scores["dark"]
        y0, y1, x0, x1 = dark["region"]
        line = f"dark region {y0}:{y1},{x0}:{x1}: temporal std {dark['denoised_std']:.4g}"
        if dark["denoised_std"] == 0:
            line += " (constant over time)"
        if "raw_std" in dark:
            line += (f" (raw {dark['raw_std']:.4g}, {dark['reduction']:.1f}× lower)"
                     if dark["reduction"] is not None else f" (raw {dark['raw_std']:.4g})")
        print(line)
    if "intensity" in scores:
        from deepcad_chunked.metrics import intensity_line

        print(intensity_line(scores["intensity"]))


def _add_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="draw raw vs denoised frames, projections and traces",
                       description="A PNG report from a few hundred frames read out of core: "
                       "raw and denoised frames with a zoomed inset, temporal standard "
                       "deviation projections, ROI traces; a GIF/MP4 of a crop on request.")
    p.add_argument("raw", metavar="RAW")
    p.add_argument("denoised", metavar="DENOISED")
    p.add_argument("-o", "--output", required=True, metavar="REPORT.png")
    p.add_argument("--frames", type=int, default=300, help="frames read (default 300)")
    p.add_argument("--roi", type=pair, action="append", metavar="Y,X",
                   help="a region of interest's centre (repeatable; default: brightest)")
    p.add_argument("--footprints", metavar="TRUTH.npz", help="a simulation's neurons as ROIs")
    p.add_argument("--movie", metavar="CROP.gif", help="also write a movie (.gif or .mp4)")
    p.add_argument("--crop", type=region, metavar="Y0:Y1,X0:X1", help="the movie's crop")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(run=_run_preview)


def _run_preview(args: argparse.Namespace) -> int:
    from deepcad_chunked.errors import ConfigError
    from deepcad_chunked.report import preview

    if args.frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {args.frames}")
    path = preview(args.raw, args.denoised, args.output, frames=args.frames, rois=args.roi,
                   footprints=args.footprints, movie=args.movie, crop=args.crop,
                   overwrite=args.overwrite)
    log.info("wrote %s", path)
    return 0
