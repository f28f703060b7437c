"""Entry point of the ``deepcad-chunked`` command.

Each subcommand parses its options into the library's validated config objects and calls one
library function. Errors caused by the user's input are printed as one line and exit non-zero;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from deepcad_chunked.cli.live import add_follow
from deepcad_chunked.cli.options import (
    EXIT_ERROR,
    SOURCES_HELP,
    add_axes_option,
    add_cluster_options,
    add_forward_options,
    add_source_options,
    add_training_options,
    cluster_of,
    forward_options,
    shard,
    source_options,
    training_config,
    triple,
)
from deepcad_chunked.cli.stores import add_store_commands
from deepcad_chunked.cli.workflow import add_commands

from deepcad_chunked import interrupt
from deepcad_chunked._version import __version__
from deepcad_chunked.errors import DeepCADError

log = logging.getLogger("deepcad_chunked.cli")

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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the denoiser on recordings (self-supervised)",
                       description="Train DeepCAD-RT's 3D U-Net on one or more recordings, "
                       "streaming tile pairs (even frames → odd frames) from their stores. "
                       "Writes epoch_NNNN.pt, last.pt, best.pt, log.csv and log.json.")
    p.add_argument("data", nargs="+", metavar="DATA.zarr",
                   help="recording store(s): ours, OME-Zarr images or Zarr arrays")
    add_axes_option(p)
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR",
                   help="folder for checkpoints and logs")
    add_training_options(p, loader_flag="--workers")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    add_cluster_options(p, local_workers=False, default=None)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.train import train

    config = training_config(args)
    with cluster_of(args, workers=1) as cluster:
        result = train(args.data, args.output, config=config, resume=args.resume,
                       progress=False if args.no_progress else None, cluster=cluster,
                       axes=args.axes)
    if result.history:  # the other processes of a launched run leave rank 0 to say it
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
    add_axes_option(p)
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
    add_store_commands(sub)
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
