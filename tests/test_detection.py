"""Matching detected ROIs with a simulation's neurons, and Suite2p's detection where installed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.detection import (
    footprint_masks,
    footprint_traces,
    iou_matrix,
    match,
    oasis_spikes,
    spike_correlation,
    suite2p_rois,
    transient_dynamics,
)
from deepcad_chunked.errors import SourceError
from deepcad_chunked.simulate import SPIKE_LAG, Footprint, load_truth, simulate, spike_counts


def _disk(cy: int, cx: int, r: float, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - cy, xx - cx) <= r


def test_matching_counts_one_to_one_hits_above_the_iou() -> None:
    true = [_disk(10, 10, 4), _disk(25, 25, 4), _disk(10, 30, 3)]
    found = [
        _disk(25, 26, 4),   # the second neuron, shifted by a pixel: IoU about 0.7
        _disk(10, 10, 4),   # the first, exactly
        _disk(11, 10, 4),   # the first again: one-to-one, so not a second hit
        _disk(33, 5, 3),    # nothing there
        _disk(10, 33, 3),   # the third, shifted by 3 px: IoU below 0.5
    ]
    scores = iou_matrix(found, true)
    assert scores[1, 0] == 1.0 and 0.5 < scores[0, 1] < 0.9 and 0 < scores[4, 2] < 0.5
    d = match(found, true, iou=0.5)
    assert (d.found, d.true, d.hits) == (5, 3, 2)
    assert d.precision == pytest.approx(2 / 5) and d.recall == pytest.approx(2 / 3)
    assert d.f1 == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))
    assert d.mean_iou == pytest.approx((1.0 + scores[0, 1]) / 2)
    assert match(found, true, iou=0.2).hits == 3  # the shifted third counts at a lower bar
    empty = match([], true)
    assert (empty.hits, empty.precision, empty.recall, empty.f1) == (0, 0.0, 0.0, 0.0)


def test_footprint_masks_keep_each_neurons_bright_pixels() -> None:
    patch = np.array([[0.0, 0.1, 0.0], [0.3, 1.0, 0.5], [0.0, 0.19, 0.0]])
    (mask,) = footprint_masks([Footprint(2, 5, patch)], (8, 10))
    assert mask.sum() == 3 and mask[3, 5] and mask[3, 6] and mask[3, 7]
    assert not mask[2, 6] and not mask[4, 6]


def test_footprint_traces_are_weighted_means() -> None:
    rng = np.random.default_rng(0)
    movie = rng.random((20, 10, 12)).astype(np.float32)
    patch = np.array([[0.0, 1.0], [3.0, 0.0]])
    (trace,) = footprint_traces(movie, [Footprint(4, 7, patch)])
    np.testing.assert_allclose(trace, (movie[:, 4, 8] + 3 * movie[:, 5, 7]) / 4, rtol=1e-6)


def test_spike_correlation_forgives_a_frame_but_not_unrelated_activity() -> None:
    rng = np.random.default_rng(1)
    spikes = (rng.random((5, 3000)) < 0.02).astype(np.float32)
    spikes[4] = 0  # a silent neuron
    same = spike_correlation(spikes, spikes)
    np.testing.assert_allclose(same[:4], 1.0)
    assert np.isnan(same[4])
    late = spike_correlation(np.roll(spikes, 1, axis=1), spikes)[:4]
    assert (late > 0.5).all() and (late < 0.95).all()
    assert (spike_correlation(np.roll(spikes, 1, axis=1), spikes, smooth=0)[:4] < 0.1).all()
    # A known delay is compared where it belongs.
    np.testing.assert_allclose(
        spike_correlation(np.roll(spikes, 1, axis=1), spikes, smooth=0, lag=1)[:4], 1.0)
    other = (rng.random((5, 3000)) < 0.02).astype(np.float32)
    assert (np.abs(spike_correlation(other, spikes)[:4]) < 0.1).all()
    with pytest.raises(ValueError, match="shape"):
        spike_correlation(spikes[:, :10], spikes)
    with pytest.raises(ValueError, match="lag"):
        spike_correlation(spikes, spikes, lag=-1)


def test_a_missing_suite2p_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "suite2p", None)  # import suite2p raises ImportError
    with pytest.raises(SourceError, match=r"pip install 'deepcad-chunked\[eval\]'"):
        suite2p_rois(np.zeros((50, 32, 32)), frame_rate=30.0, diameter=8)
    with pytest.raises(SourceError, match=r"pip install 'deepcad-chunked\[eval\]'"):
        oasis_spikes(np.zeros((2, 50)), frame_rate=30.0)


def _suite2p_or_skip() -> None:
    try:
        import suite2p  # noqa: F401
    except Exception as exc:  # not installed, or its compiled dependencies do not load
        pytest.skip(f"Suite2p (the [eval] extra) is not usable here: {exc}".splitlines()[0])


def test_suite2p_finds_the_simulated_neurons_in_the_clean_recording(tmp_path: Path) -> None:
    _suite2p_or_skip()
    files = simulate(tmp_path / "s", SimulationConfig(frames=600, size=(96, 96), photons=2.0,
                                                      seed=0))
    true = footprint_masks(load_truth(files.truth).footprints, (96, 96))
    clean = match(suite2p_rois(tifffile.imread(files.clean), frame_rate=30.0, diameter=10),
                  true)
    assert clean.f1 > 0.6, clean
    rng = np.random.default_rng(0)
    noise = rng.poisson(2.0, (600, 96, 96)).astype(np.float32)
    assert match(suite2p_rois(noise, frame_rate=30.0, diameter=10), true).hits <= 1


def test_oasis_recovers_the_simulated_spikes_better_from_clean_than_raw(tmp_path: Path) -> None:
    _suite2p_or_skip()
    files = simulate(tmp_path / "s", SimulationConfig(frames=900, size=(64, 64), photons=0.5,
                                                      seed=2))
    truth = load_truth(files.truth)
    spikes = spike_counts(truth.config).T
    r = {}
    for name, path in (("clean", files.clean), ("raw", files.raw)):
        traces = footprint_traces(tifffile.imread(path).astype(np.float32), truth.footprints)
        inferred = oasis_spikes(traces, frame_rate=30.0, window_s=10.0)
        assert inferred.shape == spikes.shape and inferred.min() >= 0
        r[name] = float(np.nanmean(spike_correlation(inferred, spikes, lag=SPIKE_LAG)))
        if name == "clean":  # the simulation's spikes show SPIKE_LAG frames later, not at once
            r["clean, unaligned"] = float(np.nanmean(spike_correlation(inferred, spikes)))
    assert r["clean"] > 0.85 and r["clean, unaligned"] < r["clean"] - 0.1, r
    assert r["raw"] < r["clean"] - 0.1, r


def test_transient_dynamics_see_flattened_peaks_slow_rises_and_lost_intensity(
        tmp_path: Path) -> None:
    """The noise-free movie scores 1 and no error; a temporal blur flattens the peaks and
    slows the rise; a movie 3 counts too dark loses ΔF in proportion."""
    from scipy import ndimage

    config = SimulationConfig(frames=900, size=(48, 48), photons=2.0, seed=3)
    files = simulate(tmp_path / "s", config)
    clean = tifffile.imread(files.clean).astype(np.float32)
    truth = load_truth(files.truth)
    spikes = spike_counts(config).T
    same = transient_dynamics(clean, clean, truth.footprints, spikes, frame_rate=30.0,
                              offset=100.0)
    assert len(same.amplitude_ratio) >= 2
    np.testing.assert_allclose(same.amplitude_ratio, 1.0)
    assert same.rise_error_ms == 0 and same.decay_error_ms == 0
    assert 0.03 < same.true_rise_s < 0.3 and 0.2 < same.true_decay_s < 1.2  # GCaMP6f-like
    blurred = ndimage.gaussian_filter1d(clean, 4.0, axis=0, mode="nearest")
    slow = transient_dynamics(blurred, clean, truth.footprints, spikes, frame_rate=30.0,
                              offset=100.0)
    assert np.median(slow.amplitude_ratio) < 0.9 and slow.rise_error_ms > 30
    dark = transient_dynamics(clean - 3, clean, truth.footprints, spikes, frame_rate=30.0,
                              offset=100.0)
    assert np.median(dark.amplitude_ratio) < np.median(same.amplitude_ratio)
