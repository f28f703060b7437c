"""Starting or joining the dask.distributed cluster that runs a job.

``connect("local")`` starts a :class:`~distributed.LocalCluster` on this machine, bound to the
loopback interface; an address (``tcp://host:port``) or a scheduler file joins a running
cluster. Later launchers (HPC job queues, several GPUs) extend :func:`connect`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster, WorkerPlugin
from distributed.system import MEMORY_LIMIT

from deepcad_chunked import launchers
from deepcad_chunked.config import FORWARD, JobQueueOptions
from deepcad_chunked.errors import ConfigError

log = logging.getLogger(__name__)

#: Seconds to wait for a scheduler given by address before giving up.
CONNECT_TIMEOUT_S = 10
_SCHEMES = ("tcp://", "tls://", "ucx://", "ws://", "wss://", "inproc://")

#: glibc malloc settings for local workers. distributed sets MALLOC_TRIM_THRESHOLD_=64 KiB, which
#: also freezes the mmap threshold at 128 KiB: every chunk-sized buffer is then mapped and
#: unmapped anew, and conversion ran 2.5× slower, mostly in page faults (benchmarks/RESULTS.md).
#: Buffers up to 32 MiB come from the heap instead, and up to 64 MiB of free heap is kept.
WORKER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": 32 * 2**20,
    "MALLOC_TRIM_THRESHOLD_": 64 * 2**20,
}


#: glibc malloc settings for the local workers that run the network. A forward pass allocates
#: and frees activations of hundreds of MiB; glibc maps each afresh (and, in a worker's task
#: thread, from a per-thread arena that maps them too), so every pass faulted in and zeroed its
#: whole peak again: 25 % system time and 1.47× the wall time of a pass that reuses its memory
#: (benchmarks/RESULTS.md). One arena, no mapping and no trimming keep the memory of the
#: largest pass for the next; an inference worker runs one pass at a time, so that is its peak.
INFERENCE_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": 1,
    "MALLOC_MMAP_MAX_": 0,
    "MALLOC_TRIM_THRESHOLD_": 2**40,
}


#: Most local worker processes per CPU core: more only add memory and start-up time.
MAX_WORKERS_PER_CORE = 2


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def local_workers(asked: int | None) -> int:
    """Worker processes of a local cluster: one per core by default, at most
    :data:`MAX_WORKERS_PER_CORE` per core (more asked for is capped, with a warning)."""
    cores = cpu_cores()
    if asked is None:
        return cores
    cap = MAX_WORKERS_PER_CORE * cores
    if asked > cap:
        log.warning("--workers %d is more than %d per CPU core on this machine (%d cores): "
                    "starting %d", asked, MAX_WORKERS_PER_CORE, cores, cap)
        return cap
    return asked


#: What a local inference worker advertises: one forward pass at a time.
INFERENCE_RESOURCES = {FORWARD: 1}


def inference_workers(asked: int | None) -> tuple[int, dict[str, Any]]:
    """Worker processes of a local cluster that runs the network, and their environment.

    One process by default, whose forward passes run the network on every core
    (``torch`` threads = cores ÷ processes) one at a time: a forward pass on two threads is
    as fast as two passes on one thread each, and a lone pass may use the whole machine's
    memory, so blocks are larger and the halo costs less (benchmarks/RESULTS.md, "Inference
    on the CPU"). Start them with :data:`~deepcad_chunked.config.INFERENCE_THREADS` and
    :data:`INFERENCE_RESOURCES`, so that reads and writes run beside the passes.

    Parameters
    ----------
    asked : int, optional
        ``--workers``; default one.

    Returns
    -------
    (int, dict)
        Processes, and the environment variables each starts with.
    """
    n = local_workers(asked or 1)
    threads = max(1, cpu_cores() // n)
    return n, {**INFERENCE_MALLOC_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


#: The dask configuration key of the interface local clusters listen on (``--host``).
HOST_KEY = "deepcad_chunked.host"
LOOPBACK = "127.0.0.1"


def _dashboard_address(host: str) -> str | None:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return None
    return f"{host}:0"


class _DropTaskFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from distributed.comm.core import CommClosedError

        if record.exc_info and isinstance(record.exc_info[1], CommClosedError):
            return False  # a peer gone as the cluster shuts down (a command ending, Ctrl-C)
        text = str(record.msg)
        return not (text.startswith("Compute Failed")
                    or text.startswith("Failed to communicate with scheduler during heartbeat")
                    or (text.startswith("Async instruction for")
                        and text.endswith("ended with CancelledError")))


class QuietTaskFailures(WorkerPlugin):
    """Keeps the workers of a local cluster from logging each failed task's traceback.

    Their standard error is the command's: a task that fails on bad input (a full disk, say)
    reaches the command as its exception, which it reports in one line; the worker's own
    report would add a traceback to the terminal, and one line per task cancelled after it.
    So would a worker that meets a closed connection (the scheduler's, another worker's) as
    the cluster shuts down after an error or Ctrl-C. Registered unless debug logging is on.
    """

    name = "deepcad-chunked-quiet-task-failures"

    def setup(self, worker: Any) -> None:
        for name in ("distributed.worker", "distributed.worker.state_machine"):
            target = logging.getLogger(name)
            if not any(isinstance(f, _DropTaskFailures) for f in target.filters):
                target.addFilter(_DropTaskFailures())


#: ``--cluster`` kinds that start a cluster for the job (besides ``local``).
LAUNCHED = ("slurm", "pbs", "sge", "lsf", "cuda")


@contextmanager
def connect(cluster: str | Client | None = "local", *, workers: int | None = None,
            threads_per_worker: int = 1, jobqueue: JobQueueOptions | None = None,
            worker_env: dict[str, Any] | None = None,
            resources: dict[str, float] | None = None) -> Iterator[Client]:
    """Yield a client of the cluster a job should run on.

    Parameters
    ----------
    cluster : str, Client or None
        ``"local"`` (or None) starts a LocalCluster, its scheduler and dashboard on loopback
        (another interface only when dask's configuration sets ``deepcad_chunked.host``, as
        ``--host`` does); ``slurm``, ``pbs``, ``sge``
        and ``lsf`` start dask-jobqueue's cluster for that batch system and ``cuda`` one
        worker per GPU (:mod:`deepcad_chunked.launchers`); ``tcp://host:port`` and other
        dask addresses, or the path of a scheduler JSON file, join a running scheduler; a
        :class:`~distributed.Client` is used as it is (and not closed).
    workers : int, optional
        Worker processes of a LocalCluster; default: one per CPU core.
    threads_per_worker : int
        Threads in each LocalCluster worker.
    jobqueue : JobQueueOptions, optional
        Jobs, cores, memory, GPUs, walltime, queue and account of a batch-system cluster.
    worker_env : dict, optional
        Environment variables of a LocalCluster's workers, over the defaults
        (:data:`WORKER_MALLOC_ENV`); :func:`inference_workers` gives those of inference.
    resources : dict, optional
        Resources each LocalCluster worker advertises (:data:`INFERENCE_RESOURCES`).

    Yields
    ------
    distributed.Client

    Raises
    ------
    ConfigError
        When ``cluster`` is none of the above or a scheduler cannot be reached in time.
    """
    if isinstance(cluster, Client):
        with nullcontext(cluster) as client:
            yield client
        return
    if cluster in (None, "local"):
        n = local_workers(workers)
        host = str(dask.config.get(HOST_KEY, default=LOOPBACK))
        if host not in (LOOPBACK, "localhost", "::1"):
            log.warning("the local cluster's scheduler and dashboard listen on %s: other "
                        "machines that reach it can submit work to it", host)
        dashboard = _dashboard_address(host)
        with _start_local(n, threads_per_worker, host, dashboard,
                          {**WORKER_MALLOC_ENV, **(worker_env or {})}, resources) as lc, \
                Client(lc) as client:
            if not log.isEnabledFor(logging.DEBUG):
                client.register_plugin(QuietTaskFailures())
            if dashboard:
                log.info("dask dashboard: %s", client.dashboard_link)
            yield client
        return
    if cluster in LAUNCHED:

        if cluster == "cuda":
            with launchers.start_cuda(workers) as started, Client(started) as client:
                yield client
            return
        options = jobqueue or JobQueueOptions()
        with launchers.start_jobqueue(cluster, options) as started, Client(started) as client:
            launchers.wait_for_first_worker(client, started, cluster, options.worker_wait)
            yield client
        return
    if workers is not None:
        log.warning("--workers applies to a local cluster only; ignored for %s", cluster)
    try:
        if cluster.startswith(_SCHEMES) or (":" in cluster and not Path(cluster).exists()):
            client = Client(cluster, timeout=CONNECT_TIMEOUT_S)
        elif Path(cluster).is_file():
            client = Client(scheduler_file=cluster, timeout=CONNECT_TIMEOUT_S)
        else:
            raise ConfigError(f"unknown cluster {cluster!r}: give 'local', one of "
                              f"{', '.join(LAUNCHED)}, a scheduler address such as "
                              "tcp://127.0.0.1:8786, or a scheduler file")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the dask scheduler at {cluster} within "
                          f"{CONNECT_TIMEOUT_S} s ({exc.__class__.__name__})") from None
    except TypeError as exc:
        if "TLS" not in str(exc):
            raise
        raise ConfigError(f"cannot reach the dask scheduler at {cluster}: it speaks TLS and "
                          "dask's configuration names no certificates (distributed.comm.tls.*"
                          " in ~/.config/dask/, or DASK_DISTRIBUTED__COMM__TLS__* variables)"
                          ) from None
    with client:
        yield client


def _start_local(workers: int, threads: int, host: str, dashboard: str | None,
                 env: dict[str, Any], resources: dict[str, float] | None = None
                 ) -> LocalCluster:
    """A LocalCluster whose workers start with ``env`` over distributed's own settings.

    distributed writes a worker's start-up environment into this process's ``os.environ``
    before spawning it, and lets a variable already there win over its configuration: a
    second cluster of one command (``run``'s denoise after its convert) or of a test session
    would silently start with the first one's variables. They are taken out for the start,
    and the command's own environment is restored afterwards.

    Each worker may use an equal share of the machine's memory (distributed's default gives a
    worker the share of its threads among the cores: half the machine to one single-threaded
    inference worker that runs the network on both cores).
    """
    spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **env}
    saved = os.environ.copy()
    for key in spawn:
        os.environ.pop(key, None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn,
                              "distributed.worker.preload": ["deepcad_chunked.local_worker"]}):
            return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                host=host, dashboard_address=dashboard,
                                memory_limit=MEMORY_LIMIT // workers, resources=resources)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def forward_resources(client: Client) -> dict[str, float] | None:
    """The resources a forward pass holds on this cluster's workers.

    One ``GPU`` where workers advertise GPUs; one :data:`~deepcad_chunked.config.FORWARD`
    slot on local inference workers (:data:`INFERENCE_RESOURCES`); none on other CPU
    workers, which run as many passes at once as they have threads.
    """
    for name in ("GPU", FORWARD):
        if _advertises(client, name):
            return {name: 1}
    return None


def _advertises(client: Client, resource: str) -> bool:
    """Whether a worker of the cluster advertises ``resource``."""
    return any(resource in (w.get("resources") or {})
               for w in client.scheduler_info().get("workers", {}).values())


def advertises_gpus(client: Client) -> bool:
    """Whether a worker of the cluster advertises a ``GPU`` resource."""
    return _advertises(client, "GPU")
