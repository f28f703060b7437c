"""The example scripts run as documented, so they never rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import zarr

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_make_tiff_then_convert_archive(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(1, 4):
        r = _run(str(EXAMPLES / "make_tiff.py"), str(parts / f"part_{k}.tif"), "--frames", "20",
                 "--size", "40", "--seed", str(k))
        assert r.returncode == 0, r.stderr
    movie = tifffile.imread(parts / "part_1.tif")
    assert movie.shape == (20, 40, 40) and movie.dtype == np.uint16 and movie.std() > 0

    r = _run(str(EXAMPLES / "convert_archive.py"), str(parts), str(tmp_path / "all.zarr"),
             "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "mean of the first 10 frames" in r.stderr
    stored = zarr.open_array(str(tmp_path / "all.zarr" / "0"))[:]
    want = np.concatenate([tifffile.imread(parts / f"part_{k}.tif") for k in range(1, 4)])
    np.testing.assert_array_equal(stored, want)


def test_denoise_simulated_runs_the_whole_api(tmp_path: Path) -> None:
    r = _run(str(EXAMPLES / "denoise_simulated.py"), str(tmp_path), "--frames", "96",
             "--size", "48", "--steps", "3", "--features", "2")
    assert r.returncode == 0, r.stderr
    assert "SNR gain over raw" in r.stderr
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert zarr.open_array(str(tmp_path / "denoised.zarr" / "0")).shape == (96, 48, 48)
