"""The ``follow`` command: denoise an acquisition while it is being recorded."""

from __future__ import annotations

import argparse
import logging

from deepcad_chunked.cli.options import (
    add_cluster_options,
    add_forward_options,
    cluster_of,
    forward_options,
    triple,
)

log = logging.getLogger("deepcad_chunked.cli")


def add_follow(sub: argparse._SubParsersAction) -> None:
    """Register ``follow``."""
    from deepcad_chunked.config import FollowConfig as C

    p = sub.add_parser("follow", help="denoise a recording while it is being acquired",
                       description="Watch SRC_DIR, where acquisition software writes TIFF "
                       "files (file_00001.tif, …, the newest growing page by page), append "
                       "each new frame to OUTDIR/recording.zarr and denoise it into "
                       "OUTDIR/denoised.zarr as soon as the frames its halo needs exist. "
                       "Ends when no frame arrives for --idle-timeout seconds or a file STOP "
                       "appears in SRC_DIR; an interrupted run resumes when rerun.")
    p.add_argument("source", metavar="SRC_DIR", help="folder the acquisition writes into")
    p.add_argument("-m", "--model", required=True, metavar="MODEL",
                   help="checkpoint (.pt) or DeepCAD-RT model (.pth)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder of recording.zarr and denoised.zarr")
    p.add_argument("--glob", metavar="PATTERN",
                   help="only files whose names match (e.g. '*_Ch1_*.tif'; default all TIFFs)")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help=f"end when no frame arrives for this long (default "
                   f"{C.model_fields['idle_timeout'].default:g})")
    p.add_argument("--block-frames", type=int, metavar="N",
                   help="frames per task while keeping up, a multiple of 8: the lag is at "
                   f"least this plus the halo (default {C.model_fields['block_frames'].default})")
    p.add_argument("--max-block-frames", type=int, metavar="N",
                   help="frames per task when behind (default "
                   f"{C.model_fields['max_block_frames'].default})")
    p.add_argument("--preview", metavar="FILE.png",
                   help="keep this picture of the newest denoised frame, raw beside it")
    p.add_argument("--chunks", type=triple, metavar="T,Y,X", help="recording.zarr's chunks "
                   "(default as convert)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                   help="Zarr format of both stores (default 3)")
    p.add_argument("--frame-rate", type=float, metavar="HZ",
                   help="frames per second, overriding the files' metadata")
    add_forward_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="start again (replaces both stores)")
    add_cluster_options(p)
    p.set_defaults(run=_run_follow)


def _run_follow(args: argparse.Namespace) -> int:
    from deepcad_chunked.config import ConvertConfig, DenoiseConfig, FollowConfig
    from deepcad_chunked.jobs.follow import follow

    recording = {"chunks": args.chunks, "zarr_format": args.zarr_format,
                 "frame_rate": args.frame_rate}
    given = {"pattern": args.glob, "idle_timeout": args.idle_timeout,
             "block_frames": args.block_frames, "max_block_frames": args.max_block_frames,
             "preview": args.preview}
    config = FollowConfig.build(
        recording=ConvertConfig.build(**{k: v for k, v in recording.items() if v is not None}),
        denoise=DenoiseConfig.build(**forward_options(args)),
        overwrite=args.overwrite, **{k: v for k, v in given.items() if v is not None})
    with cluster_of(args) as cluster:
        result = follow(args.source, args.model, args.output, config=config,
                        cluster=cluster, workers=args.workers)
    lags = sorted(result.lag_s)
    if lags:
        log.info("done: %d frames; lag from a frame's arrival to its denoised frame being "
                 "stored: median %.2f s, 95th percentile %.2f s", result.frames,
                 lags[len(lags) // 2], lags[min(len(lags) - 1, int(0.95 * len(lags)))])
    log.info("wrote %s and %s", result.recording.path, result.denoised.path)
    return 0
