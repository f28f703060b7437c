"""Data-parallel training: several processes, one per GPU or on the CPU.

:func:`fit_ranks` starts ``TrainConfig.devices`` processes that join one
``torch.distributed`` group — NCCL on GPUs, gloo on the CPU, every socket on the loopback
interface and the rendezvous in a private file, so nothing listens beyond this machine —
and each runs :func:`~deepcad_chunked.training.loop.fit` on its share of every batch
(:mod:`deepcad_chunked.training.ranks`). Rank 0 validates, calibrates and writes the
checkpoints (the caller holds the run directory's lock); a resumed run continues as an
uninterrupted one would. When one process fails or is killed, the others are stopped and the
error is one line; ``--resume`` continues from the last finished epoch.

:func:`fit_launched` is one process of a run that a launcher started (``torchrun``, on one
node or several): the launcher names the rendezvous, and stops the others when one ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deepcad_chunked import errors
from deepcad_chunked.config import TrainConfig
from deepcad_chunked.errors import DeepCADError, TrainingError
from deepcad_chunked.interrupt import check as check_interrupt
from deepcad_chunked.store.recording import Recording, open_recording
from deepcad_chunked.training.loop import TrainResult, fit
from deepcad_chunked.training.ranks import MAIN_STOPPED, Rank

log = logging.getLogger(__name__)

#: How long a process waits for the others at a collective step (rank 0's validation and
#: checkpoint included) before the run is called hung.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
#: Seconds between looks at the processes.
POLL_S = 0.2
#: Seconds the others have to end on their own (and say why) once one process has failed.
GRACE_S = 10.0


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def _on_gpus(config: TrainConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def fit_ranks(data: Sequence[str], run_dir: Path, *, config: TrainConfig, resume: bool,
              progress: bool | None, axes: str | None = None) -> TrainResult:
    """Train with ``config.devices`` processes on this node (see the module's description).

    Parameters
    ----------
    data : sequence of str
        The recordings' stores (each process opens them).
    run_dir : Path
        The run directory, whose lock the caller holds.
    config : TrainConfig
    resume : bool
    progress : bool, optional
        Rank 0's progress bar.
    axes : str, optional

    Returns
    -------
    TrainResult
        Rank 0's.

    Raises
    ------
    ConfigError
        ``cuda`` with fewer GPUs than ``devices``.
    TrainingError
        A process was killed or failed (its own error is raised when it is one of ours).
    """
    n = config.devices
    if _on_gpus(config) and torch.cuda.device_count() < n:
        raise errors.ConfigError(f"--devices {n}: this node has {torch.cuda.device_count()} "
                                 "CUDA device(s)")
    ctx = multiprocessing.get_context("spawn")
    rendezvous = Path(tempfile.mkdtemp(prefix="deepcad-ranks-"))
    env = {"GLOO_SOCKET_IFNAME": loopback_interface(), "NCCL_SOCKET_IFNAME": "lo"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: os.environ.get(k) or v for k, v in env.items()})
    procs, pipes = [], []
    try:
        for index in range(n):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_main, name=f"train-rank-{index}",
                               args=(Rank(index, n), str(rendezvous / "store"), list(data),
                                     run_dir, config, resume, progress, axes, send))
            proc.start()
            send.close()  # the child's end: the parent only reads
            procs.append(proc)
            pipes.append(receive)
        log.info("training in %d processes (%s), batch %d = %d × %d", n,
                 "one per GPU" if _on_gpus(config) else "CPU",
                 config.batch_size, n, config.batch_size // n)
        return _wait(procs, pipes)
    finally:
        _end(procs)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(rendezvous, ignore_errors=True)


def _end(procs: list[Any]) -> None:
    """Stop the processes still running (SIGTERM, then SIGKILL after 30 s) and reap them."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _read(pipes: list[Any], outcome: dict[int, tuple[str, Any]]) -> None:
    """Collect what the processes have reported so far."""
    for index, pipe in enumerate(pipes):
        try:
            if index not in outcome and pipe.poll():
                outcome[index] = pipe.recv()
        except (EOFError, OSError):  # it ended without a word: killed
            pass


def _wait(procs: list[Any], pipes: list[Any]) -> Any:
    """Rank 0's result once every process ended well; else stop them all and raise."""
    outcome: dict[int, tuple[str, Any]] = {}
    while True:
        check_interrupt()
        _read(pipes, outcome)
        codes = [p.exitcode for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        failed += [i for i, (kind, _) in outcome.items() if kind == "error" and i not in failed]
        if failed or all(c == 0 for c in codes):
            break
        time.sleep(POLL_S)
    if not failed:
        _read(pipes, outcome)
        if outcome.get(0, ("", None))[0] == "ok":
            return outcome[0][1]
        failed = [0]
    # the others end on their own once a peer is gone or rank 0 told them to stop, saying
    # why; those still waiting for the failed one after a grace period are stopped
    deadline = time.monotonic() + GRACE_S
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        _read(pipes, outcome)
        time.sleep(POLL_S)
    _end(procs)
    _read(pipes, outcome)
    failed += [i for i, (kind, _) in outcome.items() if kind == "error" and i not in failed]
    killed = [i for i in failed if (procs[i].exitcode or 0) < 0
              and outcome.get(i, ("", None))[0] != "error"]
    for index in sorted(failed):  # rank 0's own error first; "stopped by rank 0" says nothing
        kind, payload = outcome.get(index, ("", None))
        if (kind == "error" and payload[0] in vars(errors) and payload[1] != MAIN_STOPPED
                and not killed):
            raise getattr(errors, payload[0])(payload[1])
    index = killed[0] if killed else failed[0]
    code = procs[index].exitcode
    kind, payload = outcome.get(index, ("", None))
    how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
           else f"failed ({payload[1]})" if kind == "error"
           else f"ended with status {code}")
    raise TrainingError(f"training process {index} of {len(procs)} {how}; the others were "
                        "stopped: --resume continues from the last finished epoch")


def _join(rank: Rank, config: TrainConfig, init_method: str) -> None:
    """Take this process's GPU (or its share of the node's cores) and join the group."""
    cuda = _on_gpus(config)
    if cuda:
        torch.cuda.set_device(rank.device)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // rank.on_node))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method,
                            rank=rank.index, world_size=rank.size, timeout=COLLECTIVE_TIMEOUT)


def fit_launched(recordings: Sequence[Recording], run_dir: Path, *, config: TrainConfig,
                 resume: bool, progress: bool | None, rank: Rank) -> TrainResult:
    """Train as one process of a run that a launcher started (``torchrun``, on one node or
    several; :func:`~deepcad_chunked.training.ranks.launched`).

    The processes meet where the launcher says (``MASTER_ADDR``, ``MASTER_PORT``); each takes
    GPU ``LOCAL_RANK`` of its node, or its share of the node's cores. ``run_dir`` must be on a
    filesystem every node sees under the same path: rank 0 writes the checkpoints there (under
    the run lock its caller holds) and every rank reads the newest one to resume.

    Parameters
    ----------
    recordings : sequence of Recording
        Opened, checked, with statistics.
    run_dir : Path
    config : TrainConfig
        ``batch_size`` is shared by all processes of the run.
    resume : bool
    progress : bool, optional
        Rank 0's progress bar.
    rank : Rank

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        A batch the processes cannot share, or no GPU ``LOCAL_RANK`` on this node.
    TrainingError
        Another process of the run failed or was killed (the launcher stops the rest).
    """
    if config.batch_size % rank.size:
        raise errors.ConfigError(f"batch size {config.batch_size} cannot be shared by the "
                                 f"{rank.size} launched processes: make it a multiple of "
                                 f"{rank.size}")
    if _on_gpus(config) and torch.cuda.device_count() <= rank.device:
        raise errors.ConfigError(f"process {rank.index} of {rank.size} was given GPU "
                                 f"{rank.device}; this node has {torch.cuda.device_count()}")
    if not rank.main:  # one voice: rank 0 says what the run does
        logging.getLogger("deepcad_chunked").setLevel(logging.WARNING)
    try:
        _join(rank, config, "env://")
    except RuntimeError as exc:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise TrainingError(f"training process {rank.index} of {rank.size} could not join the "
                            f"others at {where} ({_first_line(exc)})") from exc
    try:
        return fit(recordings, run_dir, config=config, resume=resume,
                   progress=progress if rank.main else False, rank=rank)
    except RuntimeError as exc:
        if not _lost_peer(exc):
            raise
        raise TrainingError(f"training process {rank.index} of {rank.size} lost the others "
                            f"({_first_line(exc)}); --resume continues from the last finished "
                            "epoch") from exc
    finally:
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error, without the source location gloo puts first."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether a collective step failed because another process of the group is gone."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset"))


class _Stopped(BaseException):
    """SIGINT or SIGTERM reached a training process."""


#: Whether this training process was told to stop (its first SIGINT or SIGTERM).
_stopping: list[bool] = []


def _stop(signum: int, frame: Any) -> None:
    """Unwind the process on the first signal; later ones (the parent's own stop, reaching it
    while it already exits) change nothing."""
    if not _stopping:
        _stopping.append(True)
        raise _Stopped


def _rank_main(rank: Rank, store: str, data: list[str], run_dir: Path, config: TrainConfig,
               resume: bool, progress: bool | None, axes: str | None, report: Any) -> None:
    """One process of the group: join it, train its share, report how it ended.

    Sends ``("ok", TrainResult)`` or ``("error", (class name, one line))`` through ``report``
    and never prints a traceback: a process that loses a peer fails in the middle of a
    collective step, which the parent reports as the peer's end."""
    logging.basicConfig(level=logging.INFO if rank.main else logging.WARNING,
                        format="%(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent, or a batch system, stops it
        signal.signal(sig, _stop)
    try:
        _join(rank, config, f"file://{store}")
        try:
            recordings = [open_recording(p, axes=axes).with_statistics() for p in data]
            result = fit(recordings, run_dir, config=config, resume=resume,
                         progress=progress if rank.main else False, rank=rank)
        finally:
            dist.destroy_process_group()
        report.send(("ok", result))
    except DeepCADError as exc:
        report.send(("error", (type(exc).__name__, str(exc).strip().splitlines()[-1])))
        sys.exit(1)
    except _Stopped:
        sys.exit(1)
    except Exception as exc:
        log.debug("training process %d failed", rank.index, exc_info=True)
        line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        report.send(("error", ("", line)))
        sys.exit(1)  # an ordinary exit: what the process made (its locks) is released
