"""run, demo and preview end to end through the command line, with a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
import zarr

from tests.conftest import assert_clean_error, run_cli

TINY = ["--epochs", "1", "--steps-per-epoch", "2", "--features", "2", "--patch", "16,32,32",
        "--workers", "2",
        "--device", "cpu", "--no-progress"]


def test_run_converts_trains_denoises_exports_and_carries_on(tmp_path: Path) -> None:
    assert run_cli("simulate", "-o", str(tmp_path / "s"), "--frames", "80", "--size",
                   "40,48").returncode == 0
    out = tmp_path / "out"
    result = run_cli("run", str(tmp_path / "s.tif"), "-o", str(out), "--export", *TINY,
                     timeout=600)
    assert result.returncode == 0, result.stderr
    raw = tifffile.imread(tmp_path / "s.tif")
    denoised = zarr.open_array(str(out / "denoised.zarr" / "0"))[:]
    assert denoised.shape == raw.shape and denoised.dtype == raw.dtype
    np.testing.assert_array_equal(tifffile.imread(out / "denoised.ome.tif"), denoised)
    assert (out / "model" / "best.pt").is_file()
    # it says whether denoising helped: the held-out score and the intensity check
    assert "held-out score" in result.stderr and "best Gaussian" in result.stderr
    assert "decile of brightness" in result.stderr
    again = run_cli("run", str(tmp_path / "s.tif"), "-o", str(out), *TINY, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "already converted" in again.stderr and "already denoised" in again.stderr
    other = run_cli("simulate", "-o", str(tmp_path / "t"), "--frames", "80", "--size", "40,48")
    assert other.returncode == 0
    assert_clean_error(run_cli("run", str(tmp_path / "t.tif"), "-o", str(out), *TINY),
                       "converted from other files")


def test_demo_prints_scores_and_writes_its_report(tmp_path: Path) -> None:
    result = run_cli("demo", "-o", str(tmp_path / "demo"), "--frames", "96", "--size",
                     "48,48", "--json", *TINY, timeout=600)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    names = [row["name"] for row in scores["rows"]]
    assert names[:2] == ["denoised", "raw"] and any(n.startswith("gaussian") for n in names)
    assert scores["neurons"] > 0 and np.isfinite(scores["gain_db"])
    assert len(scores["verdict"]["intensity"]["bands"]) == 10
    assert scores["verdict"]["held_out"]["rows"]
    assert Path(scores["report"]).stat().st_size > 10_000
    again = run_cli("demo", "-o", str(tmp_path / "demo"), "--frames", "96", "--size", "48,48",
                    "--json", *TINY, timeout=600)
    assert again.returncode == 0 and "already denoised" in again.stderr
    assert json.loads(again.stdout)["rows"] == scores["rows"]


def test_preview_draws_the_report_and_a_movie(tmp_path: Path) -> None:
    assert run_cli("simulate", "-o", str(tmp_path / "s"), "--frames", "60", "--size",
                   "48,48").returncode == 0
    raw, clean = tmp_path / "s.tif", tmp_path / "s_clean.tif"
    png, gif = tmp_path / "r.png", tmp_path / "m.gif"
    result = run_cli("preview", str(raw), str(clean), "-o", str(png), "--roi", "10,10",
                     "--roi", "30,20", "--movie", str(gif), "--crop", "0:32,0:32")
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert gif.read_bytes()[:6] == b"GIF89a"
    assert_clean_error(run_cli("preview", str(raw), str(clean), "-o", str(png)),
                       "already exists")
    assert_clean_error(run_cli("preview", str(raw), str(clean), "-o", str(png), "--overwrite",
                               "--roi", "99,99"), "outside")


def test_run_takes_the_training_options_of_train(tmp_path: Path) -> None:
    """Every training option of train works in run (--val-fraction, --no-calibrate, the tile
    loaders), and ends up in the model's configuration."""
    from deepcad_chunked.model import Checkpoint

    assert run_cli("simulate", "-o", str(tmp_path / "s"), "--frames", "96", "--size",
                   "32,32").returncode == 0
    result = run_cli("run", str(tmp_path / "s.tif"), "-o", str(tmp_path / "out"),
                     "--epochs", "1", "--steps-per-epoch", "2", "--features", "2", "--patch",
                     "8,16,16", "--val-fraction", "0.25", "--batch-size", "3", "--seed", "4",
                     "--loader-workers", "0", "--no-calibrate", "--device", "cpu",
                     "--no-progress", timeout=600)
    assert result.returncode == 0, result.stderr
    ckpt = Checkpoint.load(tmp_path / "out" / "model" / "best.pt")
    assert ckpt.config["val_fraction"] == 0.25 and ckpt.config["batch_size"] == 3
    assert ckpt.config["seed"] == 4 and ckpt.config["workers"] == 0
    assert "calibration" not in ckpt.normalization
    assert "frames 72–96" in result.stderr  # the held-out score reads the held-out quarter
