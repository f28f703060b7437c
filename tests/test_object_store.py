"""Stores in an object store: every command against a real S3 API server on loopback (moto).

The commands run as real processes (their dask workers too) and find the server through the
``AWS_*`` variables, as a user's commands would; every result is compared byte for byte with
the same command run on local paths.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from deepcad_chunked.model import Checkpoint
from tests.conftest import S3, assert_clean_error, finish, run_cli, start_cli, wait_until
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
    assert_clean_error(unreachable, "object store could not be used")


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
