"""Option types and the cluster options shared by the ``deepcad-chunked`` subcommands."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepcad_chunked.errors import DeepCADError

#: What a command that reads sources takes.
SOURCES_HELP = ("TIFF file, HDF5 (FILE.h5[:/dataset]), NWB (FILE.nwb[:Series], or an https:// "
                "URL), Suite2p plane folder, raw binary (with --raw-shape), glob or directory")

#: Exit code of a command that failed on its input (one line said why).
EXIT_ERROR = 1


def _integers(text: str, axes: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {axes} integers, got {text!r}") from None
    count = axes.count(",") + 1
    if len(values) != count:
        words = {2: "two", 3: "three"}[count]
        raise argparse.ArgumentTypeError(f"expected {words} sizes {axes}, got {text!r}")
    return values


def triple(text: str) -> tuple[int, int, int]:
    """``T,Y,X`` (or ``TxYxX``) integers."""
    return _integers(text, "T,Y,X")  # type: ignore[return-value]


def shard(text: str) -> tuple[int, int, int] | str:
    """``auto``, ``none`` or ``T,Y,X`` integers."""
    word = text.strip().lower()
    return word if word in ("auto", "none") else triple(text)


def kernel(text: str) -> tuple[int, int, int] | str:
    """``none`` or ``T,Y,X`` integers (a convolution's kernel)."""
    word = text.strip().lower()
    return word if word == "none" else triple(text)


def put_kernel(values: dict[str, Any], key: str, given: tuple[int, int, int] | str | None
               ) -> None:
    """Set a config field from a :func:`kernel` option: ``none`` → None; not given → untouched."""
    if given is not None:
        values[key] = None if given == "none" else given


def pair(text: str) -> tuple[int, int]:
    """``Y,X`` (or ``YxX``) integers."""
    return _integers(text, "Y,X")  # type: ignore[return-value]


def span(text: str) -> tuple[int, int]:
    """``START:STOP`` → ``(start, stop)`` frame numbers."""
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP, got {text!r}") from None
    return start, stop


def region(text: str) -> tuple[int, int, int, int]:
    """``Y0:Y1,X0:X1`` → ``(y0, y1, x0, x1)``."""
    try:
        ys, xs = text.split(",")
        y0, y1 = (int(v) for v in ys.split(":"))
        x0, x1 = (int(v) for v in xs.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Y0:Y1,X0:X1, got {text!r}") from None
    return y0, y1, x0, x1




def size(text: str) -> int:
    """``4GiB``, ``500MB``, ``2 GB`` or a number of bytes, as dask reads sizes
    (:func:`dask.utils.parse_bytes`: ``kB``, ``MB``, ``GB`` decimal, ``KiB``, ``MiB``,
    ``GiB`` binary)."""
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(text.strip())
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB or 500MB, got {text!r}"
                                         ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return int(value)


#: The forward pass's options that ``denoise`` and ``follow`` share, by their config names.
FORWARD_OPTIONS = ("halo", "device", "precision", "dtype", "tile_memory")


def add_forward_options(p: argparse.ArgumentParser) -> None:
    """``--halo``, ``--device``, ``--precision``, ``--dtype`` and ``--tile-memory``, as
    ``denoise`` and ``follow`` take them (:data:`FORWARD_OPTIONS`)."""
    p.add_argument("--halo", type=int, metavar="N",
                   help="overlap per side, a multiple of 8 (default: the receptive radius "
                   "rounded up, exact; smaller is faster and inexact)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default fp32")
    p.add_argument("--dtype", choices=("same", "float32"),
                   help="denoised samples: the input's dtype (default) or float32")
    p.add_argument("--tile-memory", type=size, metavar="SIZE",
                   help="memory one forward pass may use, e.g. 8GiB; larger blocks are tiled "
                   "inside their task (default: from each worker's GPU or memory limit)")


def forward_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :data:`FORWARD_OPTIONS` given on the command line."""
    return {name: getattr(args, name) for name in FORWARD_OPTIONS
            if getattr(args, name) is not None}


def add_cluster_options(p: argparse.ArgumentParser, *, local_workers: bool = True,
                        default: str | None = "local") -> None:
    """``--cluster``, ``--workers``, the batch-system options and ``--no-progress``.

    ``local_workers=False`` leaves out ``--workers`` (for a command that has its own);
    ``default=None`` makes the command run in this process unless ``--cluster`` is given.
    """
    where = ("'local' starts a LocalCluster (default)" if default == "local" else
             "default: this process; 'local' runs it on a worker of a LocalCluster")
    p.add_argument("--cluster", default=default, metavar="KIND|ADDRESS",
                   help=f"{where}; slurm, pbs, sge or lsf "
                   "submit dask workers as batch jobs (dask-jobqueue); cuda starts one worker "
                   "per GPU (dask-cuda); tcp://HOST:PORT or a scheduler file joins a running "
                   "cluster")
    if local_workers:
        p.add_argument("--workers", type=int, metavar="N", help="local worker processes")
    p.add_argument("--host", metavar="ADDRESS", help="interface a local cluster's scheduler "
                   "and dashboard listen on (default 127.0.0.1: this machine only)")
    hpc = p.add_argument_group("batch-system clusters (--cluster slurm|pbs|sge|lsf); unset "
                               "values come from ~/.config/dask/jobqueue.yaml")
    hpc.add_argument("--cluster-config", metavar="FILE.yaml",
                     help="dask YAML whose jobqueue section configures this cluster, over "
                     "the user's")
    hpc.add_argument("--jobs", type=int, metavar="N", help="most jobs at once (default 4)")
    hpc.add_argument("--min-jobs", type=int, metavar="N",
                     help="jobs kept while the command runs (default 1)")
    hpc.add_argument("--cores", type=int, metavar="N", help="cores per job")
    hpc.add_argument("--memory", metavar="SIZE", help="memory per job, e.g. 32GiB")
    hpc.add_argument("--gpus-per-job", type=int, metavar="N", help="GPUs per job (0)")
    hpc.add_argument("--walltime", metavar="HH:MM:SS", help="walltime per job")
    hpc.add_argument("--queue", metavar="NAME", help="queue or partition")
    hpc.add_argument("--account", metavar="NAME", help="account to charge")
    hpc.add_argument("--worker-wait", type=float, metavar="SECONDS",
                     help="give up when no job has started a worker by then (default 900)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@contextmanager
def cluster_of(args: argparse.Namespace, *, workers: int | None = None) -> Iterator[Any]:
    """What a command passes as ``cluster=``: the ``--cluster`` text, or a started client.

    Batch-system and multi-GPU clusters are started here, with the options of
    :func:`add_cluster_options`; the library starts local clusters and joins addresses.
    ``workers`` overrides ``--workers`` (for a command that needs one worker).
    """
    import dask

    from deepcad_chunked.cluster import HOST_KEY, LAUNCHED, connect
    from deepcad_chunked.config import JobQueueOptions

    if workers is None:
        workers = getattr(args, "workers", None)
        if workers is not None and workers < 1:
            raise DeepCADError(f"--workers must be at least 1, got {workers}")
    if args.cluster not in LAUNCHED:
        host = {HOST_KEY: args.host} if getattr(args, "host", None) else {}
        with dask.config.set(host):
            yield args.cluster
        return
    names = ("jobs", "min_jobs", "cores", "memory", "gpus_per_job", "walltime", "queue",
             "account", "worker_wait")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.cluster_config:
        given["config_file"] = Path(args.cluster_config)
    options = JobQueueOptions.build(**given)
    with connect(args.cluster, workers=workers, jobqueue=options) as client:
        yield client


def add_source_options(p: argparse.ArgumentParser) -> None:
    """``--frame-rate``, ``--pixel-size`` and the layout of raw binary sources."""
    p.add_argument("--frame-rate", type=float, metavar="HZ",
                   help="frames per second, overriding the files' metadata")
    p.add_argument("--pixel-size", type=float, metavar="UM",
                   help="pixel size in µm, overriding the files' metadata")
    add_raw_options(p)


def add_raw_options(p: argparse.ArgumentParser) -> None:
    """The layout of raw binary sources: ``--raw-shape``, ``--raw-dtype``, … ."""
    raw = p.add_argument_group("raw binary sources (files without a header)")
    raw.add_argument("--raw-shape", metavar="T,Y,X",
                     help="frames, height, width; T = auto takes as many frames as each file "
                     "holds")
    raw.add_argument("--raw-dtype", metavar="TYPE",
                     help="sample type: uint16 (default), int16, float32, >u2 (big-endian), …")
    raw.add_argument("--raw-order", choices=("C", "F"),
                     help="C: frame after frame (default); F: Fortran order, t fastest")
    raw.add_argument("--raw-offset", type=int, metavar="BYTES",
                     help="bytes to skip at the start of each file (default 0)")


def source_options(args: argparse.Namespace) -> dict[str, Any]:
    """``frame_rate``, ``pixel_size`` and ``raw`` of a ConvertConfig, from the options of
    :func:`add_source_options`."""
    return {"frame_rate": args.frame_rate, "pixel_size": args.pixel_size,
            "raw": raw_layout(args)}


def raw_layout(args: argparse.Namespace) -> Any:
    """The RawLayout of :func:`add_raw_options`, or None when ``--raw-shape`` is not given."""
    from deepcad_chunked.config import RawLayout

    given = {k: getattr(args, f"raw_{k}") for k in ("dtype", "order", "offset")
             if getattr(args, f"raw_{k}") is not None}
    if args.raw_shape is None:
        if given:
            raise DeepCADError(f"--raw-{next(iter(given))} needs --raw-shape T,Y,X")
        layout = None
    else:
        try:
            text = args.raw_shape.strip()
            shape = _integers(re.sub(r"^auto(?=[,x])", "-1", text, flags=re.IGNORECASE),
                              "T,Y,X")
        except argparse.ArgumentTypeError as exc:
            raise DeepCADError(f"--raw-shape: {exc}") from None
        layout = RawLayout.build(shape=shape, **given)
    return layout


def add_axes_option(p: argparse.ArgumentParser) -> None:
    """``--axes``: the axes of a plain Zarr array that does not name them."""
    p.add_argument("--axes", metavar="TYX", help="axes of a plain Zarr array that does not "
                   "name them: t, optionally c and z, then y and x (e.g. tyx, tzyx)")


#: TrainConfig fields set by options of the same name (``--steps-per-epoch`` → steps_per_epoch).
TRAIN_FIELDS = ("epochs", "steps_per_epoch", "patch", "batch_size", "features", "lr", "schedule",
                "warmup", "loss", "average", "seed", "device", "val_fraction", "devices")


def add_training_options(p: argparse.ArgumentParser, base: Any = None, *,
                         loader_flag: str = "--loader-workers") -> None:
    """The options of ``train`` that shape a training run, for every command that trains.

    Parameters
    ----------
    p : argparse.ArgumentParser
    base : TrainConfig, optional
        The defaults shown (the command's own, e.g. the demo's); default TrainConfig's.
    loader_flag : str
        Name of the tile-loader processes option (``train`` calls it ``--workers``; where
        ``--workers`` means the cluster's workers it is ``--loader-workers``).
    """
    from deepcad_chunked.config import TrainConfig

    d = base if base is not None else TrainConfig()

    def show(value: Any) -> str:
        return "none" if value is None else (",".join(map(str, value))
                                             if isinstance(value, tuple) else str(value))

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"epochs (default {d.epochs})")
    g.add_argument("--steps-per-epoch", type=int, metavar="N", help="optimiser steps per epoch "
                   "(default: " + (show(d.steps_per_epoch) if d.steps_per_epoch else
                                   "cover the training frames once") + ")")
    g.add_argument("--patch", type=triple, metavar="T,Y,X", help="input volume pt,py,px, "
                   f"multiples of 8; a tile reads 2·pt frames (default {show(d.patch)})")
    g.add_argument("--batch-size", type=int, help=f"tiles per step (default {d.batch_size})")
    g.add_argument("--features", type=int, help="feature maps of the first level (default "
                   f"{d.features}; 16 is DeepCAD-RT's network)")
    g.add_argument("--lr", type=float, help=f"peak Adam learning rate (default {d.lr:g})")
    g.add_argument("--schedule", choices=("cosine", "constant"), help="learning rate over the "
                   "run: a linear warm-up then a cosine decay to zero, or constant "
                   f"(default {d.schedule})")
    g.add_argument("--warmup", type=float, metavar="FRACTION", help="fraction of the steps "
                   f"spent warming up (cosine; default {d.warmup:g})")
    g.add_argument("--loss", choices=("l2", "l1+l2"), help="training loss: mean squared error, "
                   f"or DeepCAD's mean of L1 and L2 (default {d.loss})")
    g.add_argument("--average", type=float, metavar="DECAY", help="keep an exponential "
                   "moving average of the weights with this decay, e.g. 0.99, for inference "
                   f"(default {d.average:g}; 0: off)")
    g.add_argument("--bypass", type=kernel, metavar="T,Y,X|none", help="kernel of the learned "
                   "linear filter added beside the U-Net, which makes training reach a given "
                   f"quality sooner (default {show(d.bypass)}); none: DeepCAD-RT's network as "
                   "published")
    g.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None,
                   help="keep the network's output as it is, without the intensity "
                   "calibration that makes denoised pixels keep their mean brightness")
    g.add_argument(loader_flag, dest="loader_workers", type=int, metavar="N",
                   help=f"tile-loading processes (default {d.workers}; 0 reads in the "
                   "training process)")
    g.add_argument("--seed", type=int, help=f"seed for weights and tiles (default {d.seed})")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help=f"where training runs (default {d.device})")
    g.add_argument("--devices", type=int, metavar="N",
                   help="train data-parallel in N processes: one per GPU of this node with "
                   "cuda, or on the CPU; each takes its share of every batch, which must be a "
                   f"multiple of N (default {d.devices})")
    g.add_argument("--val-fraction", type=float, help="fraction of the last frames held out "
                   f"for validation (default {d.val_fraction:g})")


def training_config(args: argparse.Namespace, base: Any = None) -> Any:
    """The TrainConfig of :func:`add_training_options`' values over ``base`` (or the
    defaults)."""
    from deepcad_chunked.config import TrainConfig

    values = base.model_dump() if base is not None else {}
    values.update({k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None})
    if args.loader_workers is not None:
        values["workers"] = args.loader_workers
    if args.calibrate is not None:
        values["calibrate"] = args.calibrate
    put_kernel(values, "bypass", args.bypass)
    return TrainConfig.build(**values)
