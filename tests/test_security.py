"""Network exposure: local clusters on loopback unless asked, TLS from dask's configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from distributed import Client, LocalCluster
from distributed.security import Security

from deepcad_chunked.cluster import HOST_KEY, connect
from deepcad_chunked.store.recording import open_recording
from tests.conftest import assert_clean_error, run_cli
from tests.tiffs import write_plain

ROOT = Path(__file__).resolve().parents[1]


def _listening(pid: int) -> set[str]:
    """Addresses the TCP sockets of a process listen on."""
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_local_clusters_listen_on_loopback_only() -> None:
    with connect("local", workers=1) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        # the scheduler and dashboard (in this process) and the worker: loopback only
        assert _listening(os.getpid()) <= {"127.0.0.1"}
        worker_pids = client.run(os.getpid).values()
        for pid in worker_pids:
            assert _listening(pid) <= {"127.0.0.1"}


def test_host_option_is_the_users_choice(caplog: pytest.LogCaptureFixture) -> None:
    import dask

    with dask.config.set({HOST_KEY: "0.0.0.0"}), connect("local", workers=1) as client:
        assert "0.0.0.0" in _listening(os.getpid())
        assert client.scheduler.address.startswith("tcp://")
    assert "other machines that reach it can submit work" in caplog.text


def test_the_command_line_passes_host_on(tmp_path: Path) -> None:
    raw = np.random.default_rng(1).poisson(50.0, size=(16, 32, 32)).astype(np.uint16)
    tif = write_plain(tmp_path / "rec.tif", raw)
    result = run_cli("convert", str(tif), "-o", str(tmp_path / "o.zarr"), "--workers", "1",
                     "--host", "0.0.0.0", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "listen on 0.0.0.0" in result.stderr


def _certificates(folder: Path) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1, serving as its own CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return {"key": key, "cert": cert}


def test_tls_settings_from_dasks_configuration_are_used(tmp_path: Path) -> None:
    pem = _certificates(tmp_path)
    security = Security(tls_ca_file=str(pem["cert"]), tls_client_cert=str(pem["cert"]),
                        tls_client_key=str(pem["key"]), tls_scheduler_cert=str(pem["cert"]),
                        tls_scheduler_key=str(pem["key"]), tls_worker_cert=str(pem["cert"]),
                        tls_worker_key=str(pem["key"]), require_encryption=True)
    raw = np.random.default_rng(0).poisson(50.0, size=(32, 32, 32)).astype(np.uint16)
    tif = write_plain(tmp_path / "rec.tif", raw)
    with LocalCluster(n_workers=1, threads_per_worker=1, protocol="tls", host="127.0.0.1",
                      security=security, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, security=security):
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        env = {**os.environ,
               "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
               "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(pem["cert"]),
               "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(pem["cert"]),
               "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(pem["key"])}
        result = subprocess.run([sys.executable, "-m", "deepcad_chunked.cli.main", "convert",
                                 str(tif), "-o", str(tmp_path / "out.zarr"), "--cluster",
                                 address, "--no-progress"], capture_output=True, text=True,
                                env=env, timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        np.testing.assert_array_equal(open_recording(tmp_path / "out.zarr").array[:], raw)
        # without the certificates the scheduler is not reachable, in one line
        assert_clean_error(run_cli("convert", str(tif), "-o", str(tmp_path / "no.zarr"),
                                   "--cluster", address, timeout=120), "cannot reach")
    assert not (tmp_path / "no.zarr").exists()
