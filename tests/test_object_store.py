"""Stores in an object store: every command against a real S3 API server on loopback (moto).

The commands run as real processes (their dask workers too) and find the server through the
``AWS_*`` variables, as a user's commands would; every result is compared byte for byte with
the same command run on local paths.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from deepcad_chunked.model import Checkpoint
from deepcad_chunked.store.recording import open_recording
from tests.conftest import (
    COMMAND,
    S3,
    assert_clean_error,
    finish,
    run_cli,
    start_cli,
    wait_until,
)
from tests.stall_proxy import StallingProxy
from tests.tiffs import movie, write_plain


def _ok(result: object) -> None:
    assert result.returncode == 0, result.stderr  # type: ignore[attr-defined]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_train_denoise_export_on_s3_match_the_local_run(tmp_path: Path, s3: S3) -> None:
    data = movie((64, 40, 48), "uint16")
    src = write_plain(tmp_path / "rec.tif", data)
    options = ["--chunks", "8,24,24", "--workers", "1", "--no-progress"]
    local = tmp_path / "rec.zarr"
    _ok(run_cli("convert", str(src), "-o", str(local), *options))
    _ok(run_cli("convert", str(src), "-o", s3.url("rec.zarr"), *options))
    assert s3.objects("rec.zarr/0") == _files(local / "0")
    assert not [k for k in s3.objects("rec.zarr") if k.startswith((".lock", ".progress"))]
    described = run_cli("info", s3.url("rec.zarr"), "--json")
    _ok(described)
    assert json.loads(described.stdout)["complete"] is True

    training = ["--patch", "8,16,16", "--features", "2", "--epochs", "1", "--steps-per-epoch",
                "3", "--batch-size", "2", "--seed", "3", "--device", "cpu", "--no-progress"]
    _ok(run_cli("train", s3.url("rec.zarr"), "-o", str(tmp_path / "run-s3"), *training))
    _ok(run_cli("train", str(local), "-o", str(tmp_path / "run-local"), *training))
    from_s3 = Checkpoint.load(tmp_path / "run-s3" / "last.pt").model_state
    from_disk = Checkpoint.load(tmp_path / "run-local" / "last.pt").model_state
    assert all(torch.equal(from_s3[k], from_disk[k]) for k in from_disk)

    model = tmp_path / "run-local" / "best.pt"
    s3.fs.put_file(str(model), f"{s3.bucket}/models/best.pt")
    _ok(run_cli("denoise", s3.url("rec.zarr"), "-m", s3.url("models/best.pt"), "-o",
                s3.url("dn.zarr"), "--workers", "1", "--no-progress"))
    _ok(run_cli("denoise", str(local), "-m", str(model), "-o", str(tmp_path / "dn.zarr"),
                "--workers", "1", "--no-progress"))
    assert s3.objects("dn.zarr/0") == _files(tmp_path / "dn.zarr" / "0")

    scores = [run_cli("evaluate", denoised, "--raw", raw, "--frames", "0:64", "--json")
              for denoised, raw in ((s3.url("dn.zarr"), s3.url("rec.zarr")),
                                    (str(tmp_path / "dn.zarr"), str(local)))]
    for result in scores:
        _ok(result)
    paths = ("denoised", "raw", "truth", "model")  # the network read from S3 and from disk

    def numbers(scores: dict) -> dict:
        return {k: numbers(v) if isinstance(v, dict) else v for k, v in scores.items()
                if k not in paths}

    assert [numbers(json.loads(r.stdout)) for r in scores] == \
        [numbers(json.loads(scores[1].stdout))] * 2
    assert [r["name"] for r in json.loads(scores[0].stdout)["held_out"]["rows"]].count(
        "denoised") == 1

    _ok(run_cli("export", s3.url("dn.zarr"), "-o", str(tmp_path / "s3.tif"), "--no-progress"))
    _ok(run_cli("export", str(tmp_path / "dn.zarr"), "-o", str(tmp_path / "local.tif"),
                "--no-progress"))
    from_s3_tif, local_tif = (tifffile.TiffFile(tmp_path / n) for n in ("s3.tif", "local.tif"))
    with from_s3_tif, local_tif:
        assert from_s3_tif.asarray().tobytes() == local_tif.asarray().tobytes()
        assert from_s3_tif.series[0].axes == local_tif.series[0].axes


def _markers(s3: S3, key: str, pause: float = 0.0) -> int:
    time.sleep(pause)  # polled: leave the server to the command being watched
    try:
        return len(s3.fs.ls(f"{s3.bucket}/{key}"))
    except FileNotFoundError:
        return 0


def test_a_killed_conversion_to_s3_keeps_its_lock_and_resumes_exactly(tmp_path: Path,
                                                                     s3: S3) -> None:
    data = np.random.default_rng(1).poisson(40.0, size=(600, 32, 32)).astype(np.uint16)
    src = write_plain(tmp_path / "rec.tif", data)
    options = ["--chunks", "2,32,32", "--shard", "2,32,32", "--workers", "1", "--no-progress"]
    _ok(run_cli("convert", str(src), "-o", str(tmp_path / "ref.zarr"), *options))
    out = s3.url("rec.zarr")
    first = start_cli("convert", str(src), "-o", out, *options)
    progress = "rec.zarr/.progress/convert"
    wait_until(lambda: _markers(s3, progress, pause=0.25) >= 30, first)
    assert_clean_error(run_cli("convert", str(src), "-o", out, *options),
                       "is being written by 'convert'", f"pid {first.pid}")
    os.killpg(first.pid, signal.SIGKILL)
    finish(first)
    done = _markers(s3, progress) - 1  # the sources' states are kept there too
    assert 0 < done < 300
    described = run_cli("info", out, "--json")
    assert json.loads(described.stdout)["complete"] is False
    assert_clean_error(run_cli("export", out, "-o", str(tmp_path / "x.tif")), "incomplete")

    again = run_cli("convert", str(src), "-o", out, *options)  # takes over the dead lock
    _ok(again)
    assert f"{300 - done} of 300 slabs to do" in again.stderr
    assert s3.objects("rec.zarr/0") == _files(tmp_path / "ref.zarr" / "0")
    assert not [k for k in s3.objects("rec.zarr") if k.startswith((".lock", ".progress"))]


def test_object_store_mistakes_are_one_line(tmp_path: Path, s3: S3, tiny_model: Path) -> None:
    src = write_plain(tmp_path / "rec.tif", movie((16, 16, 16), "uint16"))
    _ok(run_cli("convert", str(src), "-o", s3.url("rec.zarr"), "--no-progress"))
    assert_clean_error(run_cli("info", "s3://no-such-bucket-here/rec.zarr"), "does not exist")
    assert_clean_error(run_cli("convert", str(src), "-o", s3.url("rec.zarr"), "--no-progress"),
                       "already exists", "--overwrite")
    assert_clean_error(run_cli("denoise", s3.url("rec.zarr"), "-m", str(tiny_model), "-o",
                               s3.url("rec.zarr/dn.zarr")), "lies inside the input")
    assert_clean_error(run_cli("train", s3.url("rec.zarr"), "-o", s3.url("run"), "--patch",
                               "8,8,8"),
                       "must be a local folder")
    assert_clean_error(run_cli("export", s3.url("rec.zarr"), "-o", s3.url("x.tif")),
                       "export writes local files")
    unreachable = run_cli("info", s3.url("rec.zarr"),
                          env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert_clean_error(unreachable, "object store cannot be reached", "AWS_ENDPOINT_URL")


def test_a_lock_of_another_host_on_s3_is_respected(tmp_path: Path, s3: S3) -> None:
    src = write_plain(tmp_path / "rec.tif", movie((16, 16, 16), "uint16"))
    holder = {"host": "node-elsewhere", "pid": 4242, "process_start": 0.0,
              "since": "2026-11-24T00:00:00+00:00", "command": "convert", "token": "x"}
    s3.fs.pipe_file(f"{s3.bucket}/rec.zarr/.lock", json.dumps(holder).encode())
    assert_clean_error(run_cli("convert", str(src), "-o", s3.url("rec.zarr"), "--no-progress"),
                       "is being written by 'convert' (pid 4242 on host node-elsewhere")
    assert s3.objects("rec.zarr") == {".lock": json.dumps(holder).encode()}


def test_an_ome_zarr_image_in_a_bucket_is_read_as_it_is(tmp_path: Path, s3: S3) -> None:
    import zarr

    data = movie((24, 16, 16), "uint16")
    group = zarr.open_group(s3.url("theirs.zarr"), mode="w", zarr_format=3)
    group.create_array("full", data=data, chunks=(8, 16, 16), dimension_names=["t", "y", "x"])
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "t", "type": "time"}, {"name": "y", "type": "space"},
                 {"name": "x", "type": "space"}],
        "datasets": [{"path": "full", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 1]}]}]}]}
    before = s3.objects("theirs.zarr")
    _ok(run_cli("export", s3.url("theirs.zarr"), "-o", str(tmp_path / "t.tif"),
                "--no-progress"))
    assert tifffile.imread(tmp_path / "t.tif").tobytes() == data.tobytes()
    assert s3.objects("theirs.zarr") == before
    from deepcad_chunked import open_recording

    stats = open_recording(s3.url("theirs.zarr")).with_statistics().statistics
    assert stats["mean"] == data.mean(dtype=np.float64)
    sidecar = json.loads(s3.fs.cat_file(f"{s3.bucket}/theirs.zarr.deepcad-chunked.json"))
    assert sidecar["statistics"] == stats and s3.objects("theirs.zarr") == before


# --------------------------------------------------------------------------- a stalled store

@pytest.fixture
def stalling(s3: S3) -> Iterator[StallingProxy]:
    """A loopback proxy in front of the S3 server, which the test can make stop answering."""
    host, port = s3.endpoint.removeprefix("http://").split(":")
    proxy = StallingProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.resume()
        proxy.close()


def _stalled_conversion(tmp_path: Path, s3: S3, proxy: StallingProxy, env: dict[str, str]
                        ) -> tuple[subprocess.Popen[str], list[str], Path]:
    """A conversion to S3 through the proxy, stalled once some slabs are stored."""
    data = np.random.default_rng(4).poisson(40.0, size=(800, 32, 32)).astype(np.uint16)
    src = write_plain(tmp_path / "rec.tif", data)
    args = ["convert", str(src), "-o", s3.url("rec.zarr"), "--chunks", "2,32,32", "--shard",
            "2,32,32", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen([*COMMAND, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **env})
    wait_until(lambda: _markers(s3, "rec.zarr/.progress/convert", pause=0.25) >= 10, proc)
    proxy.stall()
    return proc, args, src


def test_a_store_that_stops_answering_ends_the_command_in_one_line(tmp_path: Path, s3: S3,
                                                                  stalling: StallingProxy
                                                                  ) -> None:
    """Every request is bounded (here 2 attempts of 3 + 3 s; of 10 + 20 s by default): the
    command ends with its one line, and after the store answers again the rerun resumes."""
    env = {"AWS_ENDPOINT_URL": stalling.endpoint, "DEEPCAD_CHUNKED_READ_TIMEOUT": "3",
           "DEEPCAD_CHUNKED_CONNECT_TIMEOUT": "3"}
    proc, args, src = _stalled_conversion(tmp_path, s3, stalling, env)
    started = time.monotonic()
    err = finish(proc, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, err
    assert took < 40, took
    assert "Traceback" not in err and "leaked" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "stopped answering" in errors[0], err
    assert "rerun the command to resume" in errors[0]
    stalling.resume()
    again = run_cli(*args, env=env)  # takes over the lock the stalled run could not remove
    _ok(again)
    np.testing.assert_array_equal(np.asarray(open_recording(s3.url("rec.zarr")).array[:]),
                                  tifffile.imread(src))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_the_store_does_not_answer_takes_seconds(tmp_path: Path, s3: S3,
                                                              stalling: StallingProxy,
                                                              sig: signal.Signals) -> None:
    """Ctrl-C or a batch system's SIGTERM while every request hangs (default limits, which
    alone would take 40 s): the command stops within seconds, resumable."""
    proc, args, src = _stalled_conversion(tmp_path, s3, stalling,
                                          {"AWS_ENDPOINT_URL": stalling.endpoint})
    time.sleep(2)  # the workers are waiting on the stalled store now
    os.killpg(proc.pid, sig)
    started = time.monotonic()
    err = finish(proc, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert took < 15, took
    assert "Traceback" not in err and "leaked" not in err, err
    assert ("interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)") in err
    stalling.resume()
    again = run_cli(*args, env={"AWS_ENDPOINT_URL": stalling.endpoint})
    _ok(again)
    assert "taking over the lock" in again.stderr
    np.testing.assert_array_equal(np.asarray(open_recording(s3.url("rec.zarr")).array[:]),
                                  tifffile.imread(src))


def test_wrong_credentials_name_the_store_and_what_to_check(tmp_path: Path) -> None:
    """A real S3 server that checks credentials (moto with authentication on)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        wait_until(lambda: _answers(port), server, timeout=60)
        src = write_plain(tmp_path / "rec.tif", movie((16, 16, 16), "uint16"))
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "wrong",
               "AWS_SECRET_ACCESS_KEY": "wrong"}
        for line in (["convert", str(src), "-o", "s3://lab/rec.zarr", "--workers", "1"],
                     ["export", "s3://lab/rec.zarr", "-o", str(tmp_path / "x.tif")]):
            assert_clean_error(run_cli(*line, "--no-progress", env=env), "s3://lab/rec.zarr",
                               "refused access", "AWS_ACCESS_KEY_ID")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_doubled_slash_in_a_url_is_one_slash(tmp_path: Path, s3: S3) -> None:
    src = write_plain(tmp_path / "rec.tif", movie((16, 16, 16), "uint16"))
    doubled = f"s3://{s3.bucket}//rec.zarr"
    _ok(run_cli("convert", str(src), "-o", doubled, "--workers", "1", "--no-progress"))
    assert "zarr.json" in s3.objects("rec.zarr")
    assert_clean_error(run_cli("convert", str(src), "-o", doubled, "--no-progress"),
                       "already exists")
    _ok(run_cli("info", s3.url("rec.zarr")))


def test_a_bad_limit_in_the_environment_is_one_line() -> None:
    result = run_cli("info", "x.zarr", env={"DEEPCAD_CHUNKED_READ_TIMEOUT": "-1"})
    assert_clean_error(result, "DEEPCAD_CHUNKED_READ_TIMEOUT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
