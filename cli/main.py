"""Entry point of the ``deepcad-chunked`` command.

Each subcommand parses its options into the library's validated config objects and calls one
library function. Errors caused by the user's input are printed as one line and exit non-zero;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from deepcad_chunked.cli.live import add_follow
from deepcad_chunked.cli.options import (
    SOURCES_HELP,
    add_cluster_options,
    add_forward_options,
    add_raw_options,
    add_source_options,
    cluster_of,
    forward_options,
    kernel,
    put_kernel,
    raw_layout,
    shard,
    source_options,
    triple,
)
from deepcad_chunked.cli.workflow import add_commands

from deepcad_chunked import interrupt
from deepcad_chunked._version import __version__
from deepcad_chunked.errors import DeepCADError

log = logging.getLogger("deepcad_chunked.cli")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from deepcad_chunked.config import DEFAULT_CHUNKS, CompressionConfig

    p = sub.add_parser("convert", help="convert a recording into a chunked OME-Zarr store",
                       description="Convert a recording — TIFF, HDF5, NWB, a Suite2p plane "
                       "folder or raw binary; one file, several files, a glob or a directory, "
                       "joined in natural sort order — into an OME-Zarr recording, losslessly "
                       "and out of core. An interrupted run resumes when rerun.")
    p.add_argument("sources", nargs="+", metavar="SRC", help=SOURCES_HELP)
    p.add_argument("-o", "--output", required=True, metavar="OUT.zarr", help="store to write")
    p.add_argument("--chunks", type=triple, metavar="T,Y,X",
                   help=f"storage chunk shape (default {','.join(map(str, DEFAULT_CHUNKS))})")
    p.add_argument("--shard", type=shard, default="auto", metavar="T,Y,X",
                   help="Zarr v3 shard shape, whole chunks: one file per shard (default auto: "
                   "whole frames, about 64 MiB; none: one file per chunk)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                   help="3: Zarr v3 + NGFF 0.5, sharded (default); 2: Zarr v2 + NGFF 0.4, "
                   "one file per chunk")
    add_source_options(p)
    p.add_argument("--compression", metavar="CODEC", help="Blosc codec: zstd, lz4, lz4hc, "
                   f"zlib, blosclz (default {_default(CompressionConfig, 'cname')})")
    p.add_argument("--clevel", type=int, help="compression level 0-9 (default "
                   f"{_default(CompressionConfig, 'clevel')})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_cluster_options(p)
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from deepcad_chunked.config import CompressionConfig, ConvertConfig
    from deepcad_chunked.jobs.convert import convert

    config = ConvertConfig.build(
        chunks=args.chunks, zarr_format=args.zarr_format,
        shards=args.shard,
        **source_options(args),
        compression=CompressionConfig.build(**{k: v for k, v in (
            ("cname", args.compression), ("clevel", args.clevel)) if v is not None}),
        overwrite=args.overwrite)
    with cluster_of(args) as cluster:
        rec = convert(args.sources, args.output, config=config, cluster=cluster,
                      workers=args.workers, progress=False if args.no_progress else None)
    stats = rec.statistics or {}
    log.info("wrote %s: %s %s, mean %.4g, std %.4g", rec.path,
             "×".join(map(str, rec.shape)), rec.dtype, stats.get("mean", float("nan")),
             stats.get("std", float("nan")))
    return 0


def _default(model: type, name: str) -> str:
    value = model.model_fields[name].default
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _add_axes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axes", metavar="TYX", help="axes of a plain Zarr array that does not "
                   "name them: t, optionally c and z, then y and x (e.g. tyx, tzyx)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from deepcad_chunked.config import TrainConfig as C

    p = sub.add_parser("train", help="train the denoiser on recordings (self-supervised)",
                       description="Train DeepCAD-RT's 3D U-Net on one or more recordings, "
                       "streaming tile pairs (even frames → odd frames) from their stores. "
                       "Writes epoch_NNNN.pt, last.pt, best.pt, log.csv and log.json.")
    p.add_argument("data", nargs="+", metavar="DATA.zarr",
                   help="recording store(s): ours, OME-Zarr images or Zarr arrays")
    _add_axes(p)
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR",
                   help="folder for checkpoints and logs")
    p.add_argument("--epochs", type=int, help=f"epochs (default {_default(C, 'epochs')})")
    p.add_argument("--steps-per-epoch", type=int, metavar="N",
                   help="optimiser steps per epoch (default: cover the training frames once)")
    p.add_argument("--patch", type=triple, metavar="T,Y,X",
                   help="input volume pt,py,px, multiples of 8; a tile reads 2·pt frames "
                   f"(default {_default(C, 'patch')})")
    p.add_argument("--batch-size", type=int,
                   help=f"tiles per step (default {_default(C, 'batch_size')})")
    p.add_argument("--features", type=int, help="feature maps of the first level (default "
                   f"{_default(C, 'features')}: DeepCAD-RT's network)")
    p.add_argument("--lr", type=float,
                   help=f"peak Adam learning rate (default {_default(C, 'lr')})")
    p.add_argument("--schedule", choices=("cosine", "constant"),
                   help="learning rate over the run: a linear warm-up then a cosine decay to "
                   f"zero, or constant (default {_default(C, 'schedule')})")
    p.add_argument("--warmup", type=float, metavar="FRACTION", help="fraction of the steps "
                   f"spent warming up (cosine; default {_default(C, 'warmup')})")
    p.add_argument("--loss", choices=("l2", "l1+l2"), help="training loss: mean squared error, "
                   f"or DeepCAD's mean of L1 and L2 (default {_default(C, 'loss')})")
    p.add_argument("--average", type=float, metavar="DECAY", help="keep an exponential "
                   "moving average of the weights with this decay, e.g. 0.99, for inference "
                   f"(default {_default(C, 'average')}: off)")
    p.add_argument("--bypass", type=kernel, metavar="T,Y,X|none", help="kernel of the learned "
                   "linear filter added beside the U-Net, which makes training reach a given "
                   f"quality sooner (default {_default(C, 'bypass')}); none: DeepCAD-RT's "
                   "network as published")
    p.add_argument("--workers", type=int, help="tile-loading worker processes (default "
                   f"{_default(C, 'workers')}; 0 reads in the training process)")
    p.add_argument("--seed", type=int, help="seed for weights and tiles")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--val-fraction", type=float, help="fraction of the last frames held out "
                   f"for validation (default {_default(C, 'val_fraction')})")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    add_cluster_options(p, local_workers=False, default=None)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from deepcad_chunked.config import TrainConfig
    from deepcad_chunked.jobs.train import train

    given = {name: getattr(args, name) for name in (
        "patch", "batch_size", "epochs", "steps_per_epoch", "features", "lr", "schedule",
        "warmup", "loss", "average", "workers", "seed", "device", "val_fraction")}
    values = {k: v for k, v in given.items() if v is not None}
    put_kernel(values, "bypass", args.bypass)
    config = TrainConfig.build(**values)
    with cluster_of(args, workers=1) as cluster:
        result = train(args.data, args.output, config=config, resume=args.resume,
                       progress=False if args.no_progress else None, cluster=cluster,
                       axes=args.axes)
    best = min(result.history, key=lambda h: h["val_loss"])
    log.info("done: best validation loss %.5g at epoch %d -> %s", best["val_loss"],
             best["epoch"], result.best)
    return 0


def _add_denoise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("denoise", help="denoise a recording with a trained model",
                       description="Denoise a recording block by block (dask map_overlap with "
                       "halos) on a dask cluster; the result equals one monolithic pass and is "
                       "written to OME-Zarr as it goes. An interrupted run resumes when rerun.")
    p.add_argument("data", metavar="DATA.zarr",
                   help="recording store: ours, an OME-Zarr image or a Zarr array")
    _add_axes(p)
    p.add_argument("-m", "--model", required=True, metavar="MODEL.pt", help="checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="OUT.zarr", help="store to write")
    p.add_argument("--block", type=triple, metavar="T,Y,X",
                   help="core block per task, multiples of 8 (default: from the device, "
                   "rounded to whole storage chunks)")
    add_forward_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_cluster_options(p)
    p.set_defaults(run=_run_denoise)


def _run_denoise(args: argparse.Namespace) -> int:
    from deepcad_chunked.config import DenoiseConfig
    from deepcad_chunked.jobs.denoise import denoise

    block = {"block": args.block} if args.block is not None else {}
    config = DenoiseConfig.build(overwrite=args.overwrite, **block, **forward_options(args))
    with cluster_of(args) as cluster:
        rec = denoise(args.data, args.model, args.output, config=config, cluster=cluster,
                      workers=args.workers, progress=False if args.no_progress else None,
                      axes=args.axes)
    log.info("wrote %s: %s %s", rec.path, "×".join(map(str, rec.shape)), rec.dtype)
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a recording store or source file",
                       description="Of a store: shape, axes, dtype, chunks, compression ratio, "
                       "frame rate, statistics, and whether it is complete. Of a source file "
                       "(TIFF, HDF5, NWB, Suite2p plane): what convert would read from it.")
    p.add_argument("path", metavar="PATH", help="OME-Zarr store, Zarr array or source file")
    _add_axes(p)
    p.add_argument("--verify", action="store_true", help="read every chunk of a store and "
                   "list those that are missing or damaged (exit 1 if any)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_raw_options(p)
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.info import describe, is_source_file

    if is_source_file(args.path):
        if args.verify:
            raise DeepCADError(f"{args.path} is a source file; --verify checks a store")
        return _print_source(args)
    if args.verify:
        return _verify(args)
    info = describe(args.path, axes=args.axes)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    stats = info["statistics"] or {}
    ratio = info["compression_ratio"]
    rows = [
        ("path", info["path"]),
        ("complete", "yes" if info["complete"] else "NO (unfinished; rerun its command)"),
        ("format", f"Zarr v{info['zarr_format']}, " + (
            f"OME-NGFF {info['ngff_version']}" if info["ngff_version"] else "plain array")),
        ("written by", info["written_by"]),
        ("axes", "".join(info["axes"])),
        ("shape", " × ".join(map(str, info["shape"]))),
        ("dtype", info["dtype"]),
        ("chunks", " × ".join(map(str, info["chunks"]))),
        ("shards", " × ".join(map(str, info["shards"])) if info["shards"] else "none"),
        ("files", str(info["files"])),
        ("compressor", ", ".join(info["compressor"])),
        ("size", f"{info['raw_bytes'] / 2**20:.1f} MiB raw, {info['stored_bytes'] / 2**20:.1f}"
                 f" MiB stored" + (f" (ratio {ratio:.2f})" if ratio else "")),
        ("frame rate", f"{info['frame_rate_hz']:.4g} Hz" if info["frame_rate_hz"]
         else "unknown"),
        ("pixel size", f"{info['pixel_size_um'][0]:.4g} × {info['pixel_size_um'][1]:.4g} µm"
         if info["pixel_size_um"] else "unknown"),
    ]
    if stats:
        pct = stats.get("percentiles", {})
        rows += [
            ("mean ± std", f"{stats['mean']:.6g} ± {stats['std']:.6g}"),
            ("min … max", f"{stats['min']:.6g} … {stats['max']:.6g}"),
            ("percentiles", ", ".join(f"{k} {v:.6g}" for k, v in pct.items())),
        ]
    _print_rows(rows)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.info import verify_store

    report = verify_store(args.path, axes=args.axes)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for problem in report["damaged"]:
            print(f"frames {problem['frames']}: {problem['why']}")
        print(f"{report['path']}: {report['frames']} frames in {report['rows']} chunk rows "
              f"read; " + (f"{len(report['damaged'])} damaged" if report["damaged"]
                           else "every chunk is there and decodes"
                           + ("" if report["checksums"] else
                              " (this store has no checksums: changed bytes may go unseen)")))
    return EXIT_ERROR if report["damaged"] else 0


def _print_rows(rows: list[tuple[str, str]]) -> None:
    """``key  value`` lines, the values aligned."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _print_source(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.info import describe_source

    info = describe_source(args.path, raw_layout(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    origin = (info["origin"] or {}).get("nwb", {})
    rows = [
        ("path", str(info["path"])),
        ("source format", str(info["source_format"]) + (f" ({info['member']})"
                                                      if info["member"] else "")),
        ("files", ", ".join(info["files"])),
        ("axes", "".join(info["axes"])),
        ("shape", " × ".join(map(str, info["shape"]))),
        ("dtype", str(info["dtype"])),
        ("size", f"{info['raw_bytes'] / 2**20:.1f} MiB"),
        ("frame rate", f"{info['frame_rate_hz']:.4g} Hz" if info["frame_rate_hz"]
         else "unknown"),
        ("pixel size", "{:.4g} × {:.4g} µm".format(*info["pixel_size_um"])
         if info["pixel_size_um"] else "unknown"),
    ]
    if origin:
        plane, device = origin.get("imaging_plane", {}), origin.get("device", {})
        rows += [("session", str(origin.get("session", {}).get("session_description"))),
                 ("device", str(device.get("name"))),
                 ("imaging plane", f"{plane.get('name')}: {plane.get('indicator')} in "
                                   f"{plane.get('location')}")]
    _print_rows(rows)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a store to TIFF, HDF5, NWB or Suite2p",
                       description="Write a recording, out of core, to an OME-TIFF (BigTIFF, "
                       "one page per frame, dtype kept), an HDF5 dataset (OUT.h5[:/dataset], "
                       "default /data), a new NWB file (keeping the session, device and imaging "
                       "plane of an NWB source) or a Suite2p plane folder (data.bin + ops.npy, "
                       "int16). The format comes from the suffix, or --format.")
    p.add_argument("source", metavar="IN.zarr",
                   help="recording store: ours, an OME-Zarr image or a Zarr array")
    _add_axes(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file to write (.tif, .h5, .nwb) or, with --format suite2p, a folder")
    p.add_argument("--format", choices=("tiff", "hdf5", "nwb", "suite2p"),
                   help="output format (default: from the output's suffix)")
    p.add_argument("--frame-rate", type=float, metavar="HZ",
                   help="frames per second written, overriding the store's (NWB needs one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.export import export

    path = export(args.source, args.output, overwrite=args.overwrite,
                  progress=False if args.no_progress else None, axes=args.axes,
                  format=args.format, frame_rate=args.frame_rate)
    log.info("wrote %s", path)
    return 0


def _add_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="write a trained network as an ONNX graph",
                       description="Write the network of a checkpoint (ours or DeepCAD-RT's "
                       ".pth) as ONNX with dynamic n, t, y, x (multiples of 8), for ONNX "
                       "Runtime or TensorRT. Needs: pip install 'deepcad-chunked[onnx]'.")
    p.add_argument("model", metavar="MODEL", help="checkpoint (.pt) or DeepCAD-RT model (.pth)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    p.add_argument("--normalize", action="store_true",
                   help="build the normalisation in: the graph takes and returns raw values")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(run=_run_export_onnx)


def _run_export_onnx(args: argparse.Namespace) -> int:
    from deepcad_chunked.model.onnx_export import export_onnx

    export_onnx(args.model, args.output, normalize=args.normalize, opset=args.opset,
                overwrite=args.overwrite)
    return 0


def _urls(args: argparse.Namespace) -> list[str]:
    """The command's arguments that are URLs (stores, sources, models), for messages."""
    from deepcad_chunked.store.location import is_url

    values: list[object] = []
    for value in vars(args).values():
        values.extend(value if isinstance(value, list) else [value])
    return [str(v) for v in values if isinstance(v, str) and is_url(v)]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deepcad-chunked`` command."""
    parser = _Parser(
        prog="deepcad-chunked",
        description="Self-supervised denoising of fluorescence recordings larger than memory.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_convert(sub)
    _add_train(sub)
    _add_denoise(sub)
    _add_info(sub)
    _add_export(sub)
    _add_export_onnx(sub)
    add_commands(sub)
    add_follow(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("deepcad-chunked: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("deepcad_chunked").setLevel(level)
    for noisy in ("distributed", "tornado", "asyncio", "bokeh"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.WARNING)
    # tifffile logs what it cannot parse at error level; our own message says what is wrong
    logging.getLogger("tifffile").setLevel(logging.CRITICAL if not verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default: ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 1 for errors in the user's input or files, 3 for internal errors,
        130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM), 141 when the reader
        of the standard output went away.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    interrupt.install()
    try:
        from deepcad_chunked.config import RemoteConfig

        RemoteConfig.from_environment()  # a bad limit in the environment: one line, now
        code = int(args.run(args))
        sys.stdout.flush()  # a reader gone away shows here, inside the try
        return code
    except DeepCADError as exc:
        if args.debug:
            log.exception("error")
        log.error("error: %s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if interrupt.received() == signal.SIGTERM:
            log.error("terminated (SIGTERM); rerun the same command to resume where it stopped")
            return EXIT_TERMINATED
        log.error("interrupted; rerun the same command to resume where it stopped")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output went away (``info ... | head -1``): not an error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if args.debug:
            log.exception("error")
        from deepcad_chunked.store.location import service_error

        if (said := service_error(exc, _urls(args))) is not None:  # a store that is a URL
            log.error("error: %s", said)
            return EXIT_ERROR
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        log.error("error: %s%s", where, exc.strerror or exc)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            log.exception("internal error")
        from deepcad_chunked.store.location import service_error

        if (said := service_error(exc, _urls(args))) is not None:  # endpoint, credentials
            log.error("error: %s", said)
            return EXIT_ERROR
        log.error("internal error: %s: %s (rerun with --debug for the traceback and please "
                  "report it)", exc.__class__.__name__, exc)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
