"""Scores on inputs whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepcad_chunked.metrics import (
    Frames,
    dark_region_std,
    darkest_region,
    intensity_bands,
    score,
    temporal_std,
)
from deepcad_chunked.simulate import Footprint, SimulationConfig, _save_truth, make_scene
from tests.conftest import assert_clean_error, run_cli


def _write(path: Path, data: np.ndarray) -> Path:
    tifffile.imwrite(path, data.astype(np.float32), photometric="minisblack")
    return path


def test_snr_and_psnr_are_the_textbook_numbers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = 10 + rng.random((100, 20, 24)) * 5  # spans more than one read chunk
    noise = rng.normal(0, 0.5, truth.shape)
    est = truth + noise
    t, e = _write(tmp_path / "t.tif", truth), _write(tmp_path / "e.tif", est)
    truth32, est32 = truth.astype(np.float32).astype(float), est.astype(np.float32).astype(float)
    sse = ((est32 - truth32) ** 2).sum()
    result = score(e, t, offset=0.0)
    (row,) = result["rows"]
    assert row["snr_db"] == pytest.approx(10 * np.log10((truth32**2).sum() / sse), abs=1e-6)
    span = truth32.max() - truth32.min()
    assert row["psnr_db"] == pytest.approx(10 * np.log10(span**2 / (sse / truth.size)),
                                           abs=1e-6)
    assert row["trace_r_mean"] is None  # no footprints given


def test_traces_correlate_through_footprints_and_gaussians_make_a_baseline(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames, shape = 200, (32, 32)
    signal = np.sin(np.arange(frames) / 7.0)[:, None, None]
    truth = np.full((frames, *shape), 100.0)
    truth[:, 4:12, 4:12] += 20 * signal
    truth[:, 20:28, 20:28] -= 20 * signal
    raw = truth + rng.normal(0, 60, truth.shape)
    patch = np.ones((8, 8), np.float32)
    scene = make_scene(SimulationConfig(frames=10, size=shape, neurons=0))
    scene = type(scene)(**{**scene.__dict__, "footprints": [Footprint(4, 4, patch),
                                                            Footprint(20, 20, patch)]})
    _save_truth(tmp_path / "fp.npz", scene, SimulationConfig(offset=100.0, size=shape))
    flipped = 200 - truth  # every trace anti-correlated with its truth
    t = _write(tmp_path / "t.tif", truth)
    result = score(_write(tmp_path / "f.tif", flipped), t, _write(tmp_path / "r.tif", raw),
                   footprints=tmp_path / "fp.npz")
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["denoised"]["trace_r_mean"] == pytest.approx(-1.0, abs=1e-6)
    assert 0.5 < rows["raw"]["trace_r_mean"] < 0.99
    best = rows[result["best_gaussian"]]
    assert best["snr_db"] > rows["raw"]["snr_db"] + 5  # smoothing a smooth scene helps
    assert best["trace_r_mean"] > rows["raw"]["trace_r_mean"]
    assert result["gain_db"] == pytest.approx(rows["denoised"]["snr_db"]
                                              - rows["raw"]["snr_db"])
    assert result["offset"] == 100.0


def test_dark_region_and_temporal_std(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    raw = rng.normal(50, 5, (130, 40, 48))
    raw[:, 20:36, 8:24] = rng.normal(5, 1, (130, 16, 16))
    assert darkest_region(raw.mean(0)) == (20, 36, 8, 24)
    path = _write(tmp_path / "r.tif", raw)
    want = raw.astype(np.float32).astype(float)[:, 20:36, 8:24].std(axis=0).mean()
    assert temporal_std(Frames(path), (20, 36, 8, 24)) == pytest.approx(want, rel=1e-9)
    smooth = _write(tmp_path / "d.tif", np.repeat(raw.mean(0, keepdims=True), 130, axis=0))
    result = dark_region_std(smooth, path)
    assert result["region"] == [20, 36, 8, 24] and result["denoised_std"] < 1e-3
    assert result["denoised_std"] == 0 and result["reduction"] is None  # constant in time


def test_evaluate_command_json_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    truth = rng.random((30, 16, 16))
    t = _write(tmp_path / "t.tif", truth)
    e = _write(tmp_path / "e.tif", truth + 0.1)
    result = run_cli("evaluate", str(e), "--truth", str(t), "--offset", "0", "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["rows"][0]["snr_db"] == pytest.approx(
        10 * np.log10((truth.astype(np.float32) ** 2).sum() / (30 * 16 * 16 * 0.01)), abs=0.01)
    result = run_cli("evaluate", str(e), "--raw", str(t), "--dark", "0:8,0:8")
    assert result.returncode == 0 and "dark region 0:8,0:8" in result.stdout
    assert_clean_error(run_cli("evaluate", str(e), "--truth", str(tmp_path / "no.tif")),
                       "does not exist")
    small = _write(tmp_path / "s.tif", truth[:10])
    assert_clean_error(run_cli("evaluate", str(e), "--truth", str(small)), "shape")
    assert_clean_error(run_cli("evaluate", str(e), "--dark", "0:99,0:8"), "not inside")


def test_the_intensity_check_finds_crushed_dim_pixels(tmp_path: Path) -> None:
    """Pixels from 2 to 200 counts: a movie that keeps them passes in every decile; one whose
    dim pixels lost 3 counts (what an undertrained network did to a real recording) fails
    in the dim deciles only, and evaluate --raw says so."""
    rng = np.random.default_rng(5)
    level = np.geomspace(2, 200, 24 * 24).reshape(1, 24, 24)
    raw = rng.poisson(np.repeat(level, 40, axis=0)).astype(np.float64)
    r = _write(tmp_path / "r.tif", raw)
    kept = _write(tmp_path / "k.tif", raw + rng.normal(0, 0.5, raw.shape))
    check = intensity_bands(kept, r)
    assert check["kept"] and len(check["bands"]) == 10
    assert all(abs(b["ratio"] - 1) < 0.03 for b in check["bands"])
    assert check["bands"][0]["high"] <= check["bands"][1]["low"]
    crushed = _write(tmp_path / "c.tif", raw - 3)
    check = intensity_bands(crushed, r)
    assert not check["kept"]
    ratios = [b["ratio"] for b in check["bands"]]
    assert ratios[0] < 0.5 and ratios[-1] > 0.97 and ratios == sorted(ratios)
    result = run_cli("evaluate", str(crushed), "--raw", str(r))
    assert result.returncode == 0, result.stderr
    assert "NOT kept" in result.stdout and "decile of brightness" in result.stdout
