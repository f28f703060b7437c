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
from pathlib import Path
from typing import Any

import dask

from deepcad_chunked.config import JobQueueOptions
from deepcad_chunked.errors import ConfigError

log = logging.getLogger(__name__)

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


def job_kwargs(kind: str, options: JobQueueOptions) -> dict[str, Any]:
    """Keyword arguments of the dask-jobqueue cluster of ``kind`` for ``options``.

    Only what the options set is passed; everything else comes from dask's configuration
    (``jobqueue.<kind>.*``), which the user's YAML files and ``--cluster-config`` fill.
    """
    given = {"cores": options.cores, "memory": options.memory, "walltime": options.walltime,
             "queue": options.queue, ACCOUNT_OPTION[kind]: options.account}
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    section = dask.config.get(f"jobqueue.{kind}", default={}) or {}
    directives = list(section.get("job-extra-directives") or [])
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
    if directives:
        kwargs["job_extra_directives"] = directives
    if extra:
        kwargs["worker_extra_args"] = extra
    return kwargs


def start_jobqueue(kind: str, options: JobQueueOptions) -> Any:
    """Start the dask-jobqueue cluster of ``kind`` and let it adapt between the job bounds.

    Raises
    ------
    ConfigError
        When dask-jobqueue is not installed, the configuration file is unreadable or the
        batch system rejects the settings.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"--cluster {kind} needs dask-jobqueue: pip install "
                          "'deepcad-chunked[hpc]'") from None
    if options.config_file is not None:
        load_config_file(options.config_file)
    kwargs = job_kwargs(kind, options)
    try:
        cluster = getattr(dask_jobqueue, JOBQUEUE[kind])(**kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"cannot configure the {kind} cluster: {exc}") from None
    cluster.adapt(minimum_jobs=options.min_jobs, maximum_jobs=options.jobs)
    log.info("%s cluster: between %d and %d jobs; dashboard %s", kind, options.min_jobs,
             options.jobs, cluster.dashboard_link)
    return cluster


def load_config_file(path: Path) -> None:
    """Merge a dask YAML configuration file into dask's configuration."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the cluster configuration {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a dask configuration (a YAML mapping)")
    dask.config.update(dask.config.config, data, priority="new")


def start_cuda(workers: int | None = None) -> Any:
    """One dask-cuda worker per visible GPU (or ``workers`` of them).

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
    return LocalCUDACluster(n_workers=count, host="127.0.0.1",
                            dashboard_address="127.0.0.1:0", resources={"GPU": 1})
