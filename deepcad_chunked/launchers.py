"""Clusters started for a job on an HPC batch system (dask-jobqueue) or a multi-GPU node.

``--cluster slurm|pbs|sge|lsf`` starts dask-jobqueue's cluster for that batch system,
configured the dask way: dask-jobqueue's packaged defaults, then the user's
``~/.config/dask/jobqueue.yaml``, then ``--cluster-config FILE.yaml``, then the few options
of :class:`JobQueueOptions`. A GPU job asks the batch system for one GPU and runs one worker
that advertises a ``GPU`` resource; worker lifetimes end before the walltime, staggered, so a
long job hands its work to fresh jobs instead of being killed mid-task. ``--cluster cuda``
starts one worker per visible GPU of this machine with dask-cuda.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import dask

from deepcad_chunked.config import INFERENCE_THREADS, JobQueueOptions
from deepcad_chunked.errors import ConfigError

log = logging.getLogger(__name__)

#: Seconds a job waits for a first worker to join a scheduler it was given.
WORKER_WAIT_S = 300

#: dask-jobqueue cluster class per ``--cluster`` kind.
JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster",
            "lsf": "LSFCluster"}
#: How each batch system is asked for ``{n}`` GPUs per job.
GPU_DIRECTIVES = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}", "sge": "-l gpu={n}",
                  "lsf": '-gpu "num={n}"'}
#: The job option that names the account (or project) charged, per batch system.
ACCOUNT_OPTION = {"slurm": "account", "pbs": "account", "sge": "project", "lsf": "project"}
#: Minutes before the walltime at which workers start to retire, and over how many minutes
#: their retirements are spread.
LIFETIME_MARGIN_MIN = 10
LIFETIME_STAGGER_MIN = 5


def wait_for_a_worker(client: Any, timeout: float = WORKER_WAIT_S) -> None:
    """Return once the cluster has a worker; fail with one line after ``timeout`` seconds.

    Raises
    ------
    ConfigError
        When no worker joins in time.
    """
    if client.scheduler_info().get("workers"):
        return
    log.info("waiting for a dask worker to join %s", client.scheduler.address)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ConfigError(f"no dask worker joined the scheduler at {client.scheduler.address} "
                          f"within {timeout:g} s") from None


def _minutes(walltime: str) -> int:
    """``HH:MM:SS``, ``MM:SS``, ``D-HH:MM:SS`` or minutes → minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", walltime.strip())
    if not match:
        raise ConfigError(f"walltime {walltime!r}: expected HH:MM:SS")
    days, first, second, third = match.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] + parts[1] / 60
    else:
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return int(minutes + 24 * 60 * int(days or 0))


def job_kwargs(kind: str, options: JobQueueOptions,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of the dask-jobqueue cluster of ``kind`` for ``options``.

    Only what ``overrides`` (the ``jobqueue.<kind>`` section of ``--cluster-config``) and the
    options set is passed; everything else comes from dask's configuration
    (``jobqueue.<kind>.*``, which the user's YAML files fill).
    """
    overrides = dict(overrides or {})
    given = {"cores": options.cores, "memory": options.memory, "walltime": options.walltime,
             "queue": options.queue, ACCOUNT_OPTION[kind]: options.account}
    kwargs: dict[str, Any] = {key.replace("-", "_"): value for key, value in overrides.items()}
    kwargs.update({k: v for k, v in given.items() if v is not None})
    section = dask.config.merge(dask.config.get(f"jobqueue.{kind}", default={}) or {},
                                overrides)
    directives = list(section.get("job-extra-directives") or [])
    # worker processes that may start processes of their own (training's tile loaders)
    prologue = [*(section.get("job-script-prologue") or []),
                "export DASK_DISTRIBUTED__WORKER__DAEMON=False"]
    extra = list(section.get("worker-extra-args") or [])
    if options.gpus_per_job > 1:
        raise ConfigError(f"--gpus-per-job {options.gpus_per_job}: each job runs one worker "
                          "on one GPU; ask for more --jobs instead (or use --cluster cuda "
                          "inside a multi-GPU allocation)")
    if options.gpus_per_job:
        directives.append(GPU_DIRECTIVES[kind].format(n=1))
        extra += ["--resources", "GPU=1"]
        kwargs["processes"] = 1  # one worker process per job: the one that owns the GPU
    walltime = options.walltime or section.get("walltime")
    if walltime and _minutes(walltime) > LIFETIME_MARGIN_MIN + LIFETIME_STAGGER_MIN:
        life = _minutes(walltime) - LIFETIME_MARGIN_MIN
        extra += ["--lifetime", f"{life}m", "--lifetime-stagger", f"{LIFETIME_STAGGER_MIN}m"]
    kwargs["job_script_prologue"] = prologue
    if directives:
        kwargs["job_extra_directives"] = directives
    if extra:
        kwargs["worker_extra_args"] = extra
    return kwargs


def make_jobqueue(kind: str, options: JobQueueOptions) -> Any:
    """The dask-jobqueue cluster of ``kind`` for ``options``, with no job submitted yet.

    Raises
    ------
    ConfigError
        When dask-jobqueue is not installed, the configuration file is unreadable or the
        settings are invalid.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"--cluster {kind} needs dask-jobqueue: pip install "
                          "'deepcad-chunked[hpc]'") from None
    overrides: dict[str, Any] = {}
    if options.config_file is not None:
        data = load_config_file(options.config_file)
        overrides = (data.get("jobqueue") or {}).get(kind) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{options.config_file}: jobqueue.{kind} is not a mapping")
    kwargs = job_kwargs(kind, options, overrides)
    try:
        return getattr(dask_jobqueue, JOBQUEUE[kind])(**kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"cannot configure the {kind} cluster: {exc}") from None


def start_jobqueue(kind: str, options: JobQueueOptions) -> Any:
    """Start the dask-jobqueue cluster of ``kind``: submit its first jobs, then let it adapt.

    The first ``min_jobs`` jobs are submitted before this returns, so a batch system that
    refuses them (an unknown partition, an account without access, too much memory) is
    reported here, in its own words, instead of in a log while the command waits.

    Raises
    ------
    ConfigError
        As :func:`make_jobqueue`, or when the batch system refuses the job.
    """
    cluster = make_jobqueue(kind, options)
    try:
        _submit(cluster, options.min_jobs)
    except RuntimeError as exc:
        _discard_unsubmitted(cluster)
        cluster.close()
        raise ConfigError(f"the {kind} batch system refused the worker job: "
                          f"{_refusal(exc)}") from None
    cluster.adapt(minimum_jobs=options.min_jobs, maximum_jobs=options.jobs)
    log.info("%s cluster: between %d and %d jobs; dashboard %s", kind, options.min_jobs,
             options.jobs, cluster.dashboard_link)
    return cluster


def _submit(cluster: Any, jobs: int) -> None:
    """Submit ``jobs`` jobs now and wait for the submissions (not for the jobs to start)."""
    while len(cluster.worker_spec) < jobs:
        cluster.worker_spec.update(cluster.new_worker_spec())
    cluster.sync(cluster._correct_state)


def _discard_unsubmitted(cluster: Any) -> None:
    """Mark jobs whose submission failed as failed, so that the cluster can close."""
    from distributed.core import Status

    for job in cluster.workers.values():
        if getattr(job, "job_id", None) is None:
            job.status = Status.failed


def _refusal(exc: BaseException) -> str:
    """The batch system's own error lines from a failed submission."""
    text = str(exc)
    errors = text.split("stderr:", 1)[-1] if "stderr:" in text else text
    lines = [line.strip() for line in errors.splitlines() if line.strip()]
    return "; ".join(lines[-2:]) or exc.__class__.__name__


def wait_for_first_worker(client: Any, cluster: Any, kind: str, timeout: float) -> None:
    """Wait until a worker of ``cluster`` joins, or fail saying what the batch system does.

    Raises
    ------
    ConfigError
        After ``timeout`` seconds without a worker, naming the jobs and (on SLURM) their
        state and the scheduler's reason.
    """
    try:
        wait_for_a_worker(client, timeout)
        return
    except ConfigError:
        pass
    ids = [str(job.job_id) for job in list(cluster.workers.values())
           if getattr(job, "job_id", None)]
    states = _job_states(kind, ids)
    what = (", ".join(f"job {i} {states.get(i, 'not found')}" for i in ids)
            if ids else "no job was submitted")
    raise ConfigError(f"no dask worker joined within {timeout:g} s on the {kind} cluster "
                      f"({what}); wait longer with --worker-wait, or check the queue, "
                      "partition and account")


def _job_states(kind: str, ids: list[str]) -> dict[str, str]:
    """``{job id: "PENDING (Resources)"}`` from ``squeue`` on SLURM; empty elsewhere."""
    if kind != "slurm" or not ids or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3:
            states[parts[0]] = f"{parts[1]} ({parts[2]})" if parts[2] != "None" else parts[1]
    return states


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a dask YAML configuration file.

    Its ``jobqueue`` section configures the cluster being started (and nothing else); any
    other section (``distributed: ...``, say) is merged into dask's configuration.

    Returns
    -------
    dict
        The file's contents.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the cluster configuration {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a dask configuration (a YAML mapping)")
    others = {k: v for k, v in data.items() if k != "jobqueue"}
    if others:
        dask.config.update(dask.config.config, others, priority="new")
    return data


def start_cuda(workers: int | None = None) -> Any:
    """One dask-cuda worker per visible GPU (or ``workers`` of them), pinned to it by
    dask-cuda (``CUDA_VISIBLE_DEVICES`` rotated per worker), with a second thread for the
    blocks' reads and writes beside the forward passes, which hold the worker's ``GPU``.

    Raises
    ------
    ConfigError
        When dask-cuda is not installed or no GPU is visible.
    """
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ConfigError("--cluster cuda needs dask-cuda: pip install dask-cuda "
                          "(on a machine with NVIDIA GPUs)") from None
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--cluster cuda: no CUDA GPU is visible on this machine")
    count = torch.cuda.device_count() if workers is None else workers
    return LocalCUDACluster(n_workers=count, threads_per_worker=INFERENCE_THREADS,
                            host="127.0.0.1", dashboard_address="127.0.0.1:0",
                            resources={"GPU": 1})
