"""The training job: open and check the recordings, hold the run directory, then train here
(:func:`deepcad_chunked.training.loop.fit`) or as one task on a worker of a dask cluster (a GPU
node of a batch system).

On a cluster the recordings stream from the shared filesystem on the worker, exactly as in a
local run; the driver only waits, reporting each finished epoch from the run's ``log.json``. A
task that is started again (its worker's job expired or was cancelled) resumes from the newest
epoch the first attempt wrote.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distributed import Client

from deepcad_chunked.cluster import advertises_gpus, connect
from deepcad_chunked.config import TrainConfig
from deepcad_chunked.errors import ConfigError, StoreError
from deepcad_chunked.launchers import wait_for_a_worker
from deepcad_chunked.store.location import resolve, write_atomic
from deepcad_chunked.store.outputs import open_folder
from deepcad_chunked.store.recording import open_recording
from deepcad_chunked.training.loop import TrainResult, check_sizes, fit
from deepcad_chunked.training.processes import fit_launched, fit_ranks
from deepcad_chunked.training.ranks import launched

log = logging.getLogger(__name__)

#: Seconds between looks at the run's log while the task runs.
POLL_S = 5.0
#: File in the run directory naming the submission that last started training there.
ATTEMPT_FILE = ".submission"
#: Environment variables that say which batch job a worker runs in.
JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "JOB_ID", "LSB_JOBID")


def train(data: str | Path | Sequence[str | Path], run_dir: str | Path, *,
          config: TrainConfig | None = None, resume: bool = False,
          progress: bool | None = None, cluster: str | Any | None = None,
          lock: bool = True, axes: str | None = None) -> TrainResult:
    """Train the denoiser on one or more recordings, streaming tiles from their stores.

    In a process that a launcher started as one of several (``torchrun``:
    :func:`~deepcad_chunked.training.ranks.launched`), this is that process's share of a
    data-parallel run, whose rank 0 alone holds ``run_dir`` and writes the checkpoints.

    Parameters
    ----------
    data : path or sequence of paths
        Complete recording stores written by :func:`deepcad_chunked.convert`, OME-Zarr
        images written by other tools, or plain Zarr arrays.
    run_dir : str or Path
        Folder for checkpoints and logs (created if needed).
    config : TrainConfig, optional
        Tile size, batch, epochs, optimiser, loader workers, seed, device.
    resume : bool
        Continue the run in ``run_dir`` from its ``last.pt``.
    progress : bool, optional
        Progress bar; default: when standard error is a terminal.
    cluster : str or distributed.Client, optional
        Train in this process (None, the default), or as one task on a worker of this
        cluster (``--cluster`` kinds and addresses, or a client): a GPU node of a batch
        system, say. The stores and ``run_dir`` must then be on a filesystem the workers
        share, under the same paths.
    lock : bool
        Hold the run directory's writer lock while training (the default); False only where
        the caller holds it (the cluster task of a driver that does).
    axes : str, optional
        Axis names of plain Zarr arrays that do not name them (``"tyx"``).

    Returns
    -------
    TrainResult

    Raises
    ------
    StoreError, ConfigError, DeepCADError
        Incomplete or foreign stores, recordings smaller than a tile, an unwritable run
        directory, a run directory that is or lies inside a store, or a ``resume`` whose
        checkpoint was made with other options or data.
    LockedError
        Another process is training into ``run_dir``.
    TrainingError
        The loss stopped being finite (training diverged).
    """
    config = config or TrainConfig()
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if not paths:
        raise StoreError("no training data given")
    recordings = [open_recording(p, axes=axes).with_statistics() for p in paths]
    check_sizes(recordings, config)  # refuse bad data before anything is started
    folder = resolve(run_dir)
    if not isinstance(folder, Path):
        raise StoreError(f"{run_dir}: the run directory must be a local folder (its "
                         "recordings may be URLs)")
    launch = launched()  # one process of a run that torchrun started, or None
    if launch is not None and (cluster is not None or config.devices > 1):
        raise ConfigError(f"this process is rank {launch.index} of {launch.size} started by a "
                          "launcher (torchrun): it takes one device, without --devices or "
                          "--cluster")
    if lock and (launch is None or launch.main):  # a launched run's rank 0 holds it alone
        with open_folder(folder, command="train", inputs=[r.path for r in recordings]):
            return train(paths, folder, config=config, resume=resume, progress=progress,
                         cluster=cluster, lock=False, axes=axes)
    if launch is not None:
        return fit_launched(recordings, folder, config=config, resume=resume,
                            progress=progress, rank=launch)
    if cluster is not None:
        if config.devices > 1:
            raise ConfigError("--devices trains in several processes of this node; with "
                              "--cluster training is one task on one worker (run the command "
                              "with --devices inside the node's batch job instead)")
        with connect(cluster, workers=1) as client:
            return train_on_cluster(client, paths, folder, config=config, resume=resume,
                                    axes=axes)
    if config.devices > 1:
        return fit_ranks([str(p) for p in paths], folder, config=config,
                         resume=resume, progress=progress, axes=axes)
    return fit(recordings, folder, config=config, resume=resume, progress=progress)


def train_on_cluster(client: Client, data: Sequence[str | Path], run_dir: str | Path, *,
                     config: TrainConfig, resume: bool = False,
                     poll_s: float = POLL_S, axes: str | None = None) -> TrainResult:
    """Run :func:`train` as one task on a worker of ``client``.

    On a cluster whose workers advertise ``GPU`` resources the task asks for one GPU.

    Parameters
    ----------
    client : distributed.Client
    data : sequence of paths
        Recording stores, on a filesystem the workers see under the same paths.
    run_dir : str or Path
        Folder for checkpoints and logs, on that filesystem too.
    config : TrainConfig
    resume : bool
        Continue the run in ``run_dir``.
    poll_s : float
        Seconds between progress reports.
    axes : str, optional
        Axis names of plain Zarr arrays that do not name them.

    Returns
    -------
    TrainResult
    """
    run_dir = Path(run_dir).expanduser().absolute()
    paths = [str(Path(p).expanduser().absolute()) for p in data]
    wait_for_a_worker(client)
    gpus = advertises_gpus(client)
    submission = uuid.uuid4().hex
    future = client.submit(_train_task, paths, str(run_dir), config, resume, submission, axes,
                           resources={"GPU": 1} if gpus else None, pure=False,
                           key=f"train-{submission}")
    log.info("training submitted to the cluster%s; checkpoints in %s",
             " (one GPU)" if gpus else "", run_dir)
    reported = 0
    try:
        while True:
            try:
                result, where = future.result(timeout=poll_s)
                break
            except TimeoutError:
                reported = _report_epochs(run_dir / "log.json", reported, config.epochs)
    except BaseException:
        future.cancel()
        raise
    _report_epochs(run_dir / "log.json", reported, config.epochs)
    log.info("trained on %s", where)
    return result


def _report_epochs(path: Path, reported: int, epochs: int) -> int:
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        return reported
    if not isinstance(history, list):
        return reported
    for row in history[reported:]:
        log.info("epoch %d/%d: train loss %.5g, validation loss %.5g (%.0f s)", row["epoch"],
                 epochs, row["train_loss"], row["val_loss"], row.get("seconds", 0.0))
    return max(reported, len(history))


def _train_task(data: list[str], run_dir: str, config: TrainConfig, resume: bool,
                submission: str, axes: str | None = None) -> tuple[TrainResult, str]:
    """The task: train, resuming when an earlier attempt of this submission was cut."""
    marker = Path(run_dir) / ATTEMPT_FILE
    try:
        again = marker.read_text().strip() == submission
    except OSError:
        again = False
    if again:
        log.warning("training was restarted on another worker; resuming %s", run_dir)
    if config.workers and multiprocessing.current_process().daemon:
        log.warning("this dask worker cannot start tile-loading processes (set "
                    "distributed.worker.daemon: false); loading tiles in the training process")
        config = config.model_copy(update={"workers": 0})
    if not again:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(marker, submission.encode())
    import torch

    # dask workers start with one thread per library; training may use the job's cores
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        result = train(data, run_dir, config=config, resume=resume or again, progress=False,
                       lock=False, axes=axes)  # the driver holds the run directory's lock
    finally:
        torch.set_num_threads(threads)
    return result, _where()


def _where() -> str:
    jobs = [f"{name}={os.environ[name]}" for name in JOB_VARIABLES if os.environ.get(name)]
    return f"{socket.gethostname()}" + (f" ({', '.join(jobs)})" if jobs else "")


def batch_job() -> str | None:
    """The id of the batch job this process runs in (SLURM, PBS, SGE or LSF), if any."""
    return next((os.environ[name] for name in JOB_VARIABLES if os.environ.get(name)), None)


def worker_jobs(client: Client) -> dict[str, Any]:
    """``{worker address: its batch job id or None}``."""
    return client.run(batch_job)
