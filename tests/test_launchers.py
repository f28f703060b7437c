"""Batch-system clusters: the job scripts each scheduler would receive (no jobs submitted)."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest

from deepcad_chunked.config import JobQueueOptions
from deepcad_chunked.errors import ConfigError
from deepcad_chunked.launchers import _minutes, job_kwargs, make_jobqueue
from tests.conftest import assert_clean_error, run_cli

# loaded before any dask.config.set, whose exit would otherwise drop its defaults again
pytest.importorskip("dask_jobqueue")

GPU_JOB = {"jobs": 3, "cores": 8, "memory": "32GiB", "gpus_per_job": 1,
           "walltime": "02:00:00", "queue": "gpu", "account": "lab42"}
EXPECTED = {
    "slurm": ["#SBATCH -p gpu", "#SBATCH -A lab42", "#SBATCH -t 02:00:00",
              "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8"],
    "pbs": ["#PBS -q gpu", "#PBS -A lab42", "#PBS -l walltime=02:00:00", "#PBS -l ngpus=1"],
    "sge": ["#$ -q gpu", "#$ -P lab42", "#$ -l h_rt=02:00:00", "#$ -l gpu=1"],
    "lsf": ["#BSUB -q gpu", '#BSUB -P "lab42"', "#BSUB -W 02:00", '#BSUB -gpu "num=1"'],
}


def _script(kind: str, **options: object) -> str:
    with dask.config.set({f"jobqueue.{kind}.scheduler-options": {"host": "127.0.0.1"}}):
        cluster = make_jobqueue(kind, JobQueueOptions(**options))
        try:
            return cluster.job_script()
        finally:
            cluster.close()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_gpu_job_scripts_ask_for_the_gpu_walltime_queue_and_account(kind: str) -> None:
    script = _script(kind, **GPU_JOB)
    for line in EXPECTED[kind]:
        assert line in script, (line, script)
    worker = script.strip().splitlines()[-1]
    assert "--resources GPU=1" in worker and "--nworkers" not in worker  # one process
    # retire 10 minutes before the walltime, spread over 5, so work moves to fresh jobs
    assert "--lifetime 110m --lifetime-stagger 5m" in worker


def test_cpu_jobs_have_no_gpu_and_user_yaml_is_merged(tmp_path: Path) -> None:
    config = tmp_path / "jobqueue.yaml"
    config.write_text("jobqueue:\n  slurm:\n    job-extra-directives: ['--constraint=a100']\n"
                      "    walltime: '00:30:00'\n")
    script = _script("slurm", cores=2, memory="4GiB", config_file=config)
    assert "#SBATCH --constraint=a100" in script and "#SBATCH -t 00:30:00" in script
    assert "gres" not in script and "GPU=1" not in script
    assert "--lifetime 20m" in script


def test_options_that_cannot_work() -> None:
    with pytest.raises(ConfigError, match="more --jobs"):
        job_kwargs("slurm", JobQueueOptions(gpus_per_job=2))
    with pytest.raises(ConfigError, match="HH:MM:SS"):
        _minutes("two hours")
    assert _minutes("1-00:10:00") == 24 * 60 + 10 and _minutes("45") == 45


def test_command_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("[1, 2")
    src = tmp_path / "none.tif"
    assert_clean_error(run_cli("convert", str(src), "-o", str(tmp_path / "o.zarr"),
                               "--cluster", "slurm", "--min-jobs", "5", "--jobs", "2"),
                       "min_jobs")
    assert_clean_error(run_cli("convert", str(src), "-o", str(tmp_path / "o.zarr"),
                               "--cluster", "slurm", "--cluster-config", str(bad)),
                       "cannot read the cluster configuration")
    pytest.importorskip("torch")
    assert_clean_error(run_cli("convert", str(src), "-o", str(tmp_path / "o.zarr"),
                               "--cluster", "cuda"), "cuda")


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "hpc"


@pytest.mark.parametrize("kind, lines", [
    ("slurm", ["#SBATCH -p gpu", "#SBATCH -A my-lab", "#SBATCH --gres=gpu:1",
               "#SBATCH --cpus-per-task=8", "#SBATCH -t 04:00:00",
               "source $HOME/venvs/deepcad/bin/activate"]),
    ("pbs", ["#PBS -q gpuq", "#PBS -A my-project", "#PBS -l select=1:ncpus=8:mem=64GB:ngpus=1",
             "#PBS -l walltime=04:00:00", "cd $PBS_O_WORKDIR"]),
])
def test_example_configs_give_gpu_jobs(kind: str, lines: list[str]) -> None:
    config = EXAMPLES / ("slurm-gpu.yaml" if kind == "slurm" else "pbs.yaml")
    script = _script(kind, config_file=config)
    for line in lines:
        assert line in script, (line, script)
    worker = script.strip().splitlines()[-1]
    assert "--resources GPU=1" in worker and "--lifetime 230m" in worker
    assert "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in script


def test_a_cluster_config_file_does_not_leak_into_later_clusters(tmp_path: Path) -> None:
    config = tmp_path / "a100.yaml"
    config.write_text("jobqueue:\n  slurm:\n    job-extra-directives: ['--constraint=a100']\n")
    assert "--constraint=a100" in _script("slurm", cores=1, memory="1GiB", config_file=config)
    assert "--constraint=a100" not in _script("slurm", cores=1, memory="1GiB")
