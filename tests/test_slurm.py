"""Workers started by a real SLURM controller through dask-jobqueue.

``scripts/local-slurm.sh start`` (run by ``.ci/run``) sets up a one-node SLURM on this machine;
where no controller answers, these tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, get_task_stream

from deepcad_chunked import ConvertConfig, DenoiseConfig, convert, denoise
from deepcad_chunked.cluster import connect
from deepcad_chunked.config import JobQueueOptions
from deepcad_chunked.jobs.train import worker_jobs
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.store.recording import open_recording
from tests.conftest import assert_clean_error, run_cli, stored_chunks
from tests.tiffs import write_plain

# loaded before any dask.config.set, whose exit would otherwise drop its defaults again
pytest.importorskip("dask_jobqueue")


def _slurm_missing() -> str | None:
    """Why SLURM cannot run jobs here, or None when it can."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is not installed (scripts/local-slurm.sh start sets up one node)"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if info.returncode != 0:
        return f"no SLURM controller answers: {info.stderr.strip()}"
    if not any(line.split()[1].startswith(("idle", "mix", "alloc"))
               for line in info.stdout.splitlines() if line.endswith("*") or "*" in line):
        return "the default SLURM partition has no node up"
    return None


MISSING = _slurm_missing()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def _partitions() -> set[str]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout
    return {line.strip().rstrip("*") for line in out.splitlines()}


@pytest.fixture
def slurm_config(tmp_path: Path) -> Path:
    """Small CPU jobs whose scheduler listens on loopback and whose logs stay in tmp_path."""
    path = tmp_path / "slurm.yaml"
    path.write_text(f"""jobqueue:
  slurm:
    cores: 1
    memory: 2GiB
    walltime: "00:30:00"
    log-directory: {tmp_path / "job-logs"}
    scheduler-options:
      host: 127.0.0.1
      dashboard_address: "127.0.0.1:0"
""")
    return path


@pytest.fixture(scope="module")
def model_path(tiny_model: Path) -> Path:
    return tiny_model


def _movie(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100.0, size=shape).astype("uint16")


def _job_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    return set(out.split())


CONVERT = ConvertConfig(chunks=(16, 32, 32))
DENOISE = DenoiseConfig(block=(48, 48, 48), dtype="float32", device="cpu")


def test_convert_and_denoise_on_sbatch_workers_equal_a_local_run(
        tmp_path: Path, client: Client, slurm_config: Path, model_path: Path) -> None:
    tif = write_plain(tmp_path / "rec.tif", _movie((96, 64, 64)))
    local = convert(tif, tmp_path / "local.zarr", config=CONVERT, cluster=client,
                    progress=False)
    local_out = denoise(local.path, model_path, tmp_path / "local-out.zarr", config=DENOISE,
                        cluster=client, progress=False)

    options = JobQueueOptions(jobs=2, min_jobs=2, config_file=slurm_config, worker_wait=120)
    with connect("slurm", jobqueue=options) as slurm:
        slurm.wait_for_workers(2, timeout=120)
        jobs = worker_jobs(slurm)
        assert all(jobs.values()) and len(set(jobs.values())) == 2, jobs
        assert set(jobs.values()) <= _job_ids()  # running jobs of this controller
        with get_task_stream(client=slurm) as stream:
            rec = convert(tif, tmp_path / "slurm.zarr", config=CONVERT, cluster=slurm,
                          progress=False)
            out = denoise(rec.path, model_path, tmp_path / "slurm-out.zarr", config=DENOISE,
                          cluster=slurm, progress=False)
        ran_on = {task["worker"] for task in stream.data}
    assert ran_on and ran_on <= set(jobs)  # every task ran on a worker inside a SLURM job
    assert rec.complete and out.complete
    assert stored_chunks(rec.path) == stored_chunks(local.path)
    assert stored_chunks(out.path) == stored_chunks(local_out.path)
    logs = list((tmp_path / "job-logs").glob("*.err"))
    assert logs and any("Start worker" in p.read_text() for p in logs)


def test_denoise_survives_a_cancelled_job(tmp_path: Path, client: Client, slurm_config: Path,
                                          model_path: Path) -> None:
    tif = write_plain(tmp_path / "rec.tif", _movie((192, 96, 96), seed=1))
    rec = convert(tif, tmp_path / "rec.zarr", config=CONVERT, cluster=client, progress=False)
    reference = denoise(rec.path, model_path, tmp_path / "reference.zarr", config=DENOISE,
                        cluster=client, progress=False)

    out = tmp_path / "out.zarr"
    options = JobQueueOptions(jobs=2, min_jobs=2, config_file=slurm_config, worker_wait=120)
    cancelled: dict[str, object] = {}
    with connect("slurm", jobqueue=options) as slurm:
        slurm.wait_for_workers(2, timeout=120)
        jobs = worker_jobs(slurm)

        def cancel_a_busy_job() -> None:
            markers = out / ".progress" / "denoise"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if markers.is_dir() and list(markers.glob("*.done")):
                    busy = [w for w, keys in slurm.processing().items() if keys and w in jobs]
                    if busy:
                        cancelled["job"] = jobs[busy[0]]
                        cancelled["done"] = len(list(markers.glob("*.done")))
                        subprocess.run(["scancel", jobs[busy[0]]], check=True)
                        return
                time.sleep(0.05)

        canceller = threading.Thread(target=cancel_a_busy_job, daemon=True)
        canceller.start()
        result = denoise(rec.path, model_path, out, config=DENOISE, cluster=slurm,
                         progress=False)
        canceller.join(timeout=10)
    assert "job" in cancelled, "denoising ended before a busy job could be cancelled"
    assert cancelled["done"] < 16  # 16 blocks: the job was cut mid-run
    assert cancelled["job"] not in _job_ids()
    assert result.complete
    assert stored_chunks(out) == stored_chunks(reference.path)


def test_training_runs_as_a_gpu_job(tmp_path: Path, client: Client,
                                    slurm_config: Path) -> None:
    rec = convert(write_plain(tmp_path / "rec.tif", _movie((96, 48, 48))),
                  tmp_path / "rec.zarr", config=CONVERT, cluster=client, progress=False)
    run = tmp_path / "run"
    result = run_cli("train", str(rec.path), "-o", str(run), "--cluster", "slurm",
                     "--cluster-config", str(slurm_config), "--gpus-per-job", "1",
                     "--device", "cpu", "--features", "2", "--patch", "16,16,16",
                     "--batch-size", "2", "--epochs", "2", "--steps-per-epoch", "2",
                     "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    # the job asked SLURM for a GPU (a GRES of the test node) and the task for the worker's
    assert "training submitted to the cluster (one GPU)" in result.stderr
    assert "trained on" in result.stderr and "SLURM_JOB_ID=" in result.stderr
    assert "epoch 2/2" in result.stderr
    assert (run / "best.pt").is_file() and Checkpoint.load(run / "last.pt").epoch == 2
    script = next((tmp_path / "job-logs").glob("*.err")).read_text()
    assert "Start worker" in script


def test_refused_and_never_started_jobs_are_one_line_errors(tmp_path: Path,
                                                            slurm_config: Path) -> None:
    tif = write_plain(tmp_path / "rec.tif", _movie((32, 32, 32)))
    out = tmp_path / "out.zarr"
    before = _job_ids()
    assert_clean_error(run_cli("convert", str(tif), "-o", str(out), "--cluster", "slurm",
                               "--cluster-config", str(slurm_config), "--queue", "no-such"),
                       "refused the worker job", "invalid partition")
    if "closed" not in _partitions():
        pytest.skip("no partition 'closed' (one that never starts jobs) on this SLURM")
    started = time.monotonic()
    result = run_cli("convert", str(tif), "-o", str(out), "--cluster", "slurm",
                     "--cluster-config", str(slurm_config), "--queue", "closed",
                     "--worker-wait", "5")
    assert_clean_error(result, "no dask worker joined within 5 s", "PENDING")
    assert time.monotonic() - started < 60
    assert not out.exists()
    deadline = time.monotonic() + 30  # the pending job is cancelled on the way out
    while not _job_ids() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _job_ids() <= before


def test_the_in_allocation_example_runs_the_whole_pipeline(tmp_path: Path) -> None:
    tif = write_plain(tmp_path / "rec.tif", _movie((96, 48, 48)))
    outdir, log = tmp_path / "results", tmp_path / "job.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = Path(__file__).resolve().parents[1] / "examples" / "hpc" / "run-in-allocation.sh"
    job = subprocess.run(["sbatch", "--wait", "-n", "2", "-c", "1", "--mem=6G", "-o", str(log),
                          str(script), str(tif), str(outdir), "--features", "2", "--patch",
                          "16,16,16", "--epochs", "1", "--steps-per-epoch", "2",
                          "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    text = log.read_text() if log.exists() else ""
    assert job.returncode == 0, job.stderr + text
    assert "trained on" in text and "SLURM_JOB_ID=" in text  # training ran on a worker
    rec = open_recording(outdir / "denoised.zarr")
    assert rec.complete and rec.shape == (96, 48, 48)
    assert not list(outdir.glob(".dask-*"))  # the script cleaned up after itself
