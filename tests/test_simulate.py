"""The simulator: realistic statistics, noise-free ground truth, determinism, streaming."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import signal

from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.errors import OutputExistsError
from deepcad_chunked.simulate import (
    RISE_TAU_S,
    clean_chunks,
    load_truth,
    make_scene,
    simulate,
    spike_counts,
)
from tests.conftest import assert_clean_error, run_cli


def _sim(folder: Path, name: str = "s", **values: object):
    config = SimulationConfig(**{"frames": 150, "size": (64, 80), **values})
    return simulate(folder / name, config), config


@pytest.mark.parametrize("photons", [0.5, 4.0])
def test_the_photon_level_sets_the_noise(tmp_path: Path, photons: float) -> None:
    files, config = _sim(tmp_path, photons=photons)
    raw = tifffile.imread(files.raw).astype(np.float64)
    clean = tifffile.imread(files.clean).astype(np.float64)
    expected = (clean - config.offset) / config.gain  # photons
    assert abs(expected.mean() - photons) < 0.1 * photons
    # Poisson–Gaussian: variance = gain² · photons + read noise² + rounding
    predicted = (config.gain**2 * expected + config.read_noise**2 + 1 / 12).mean()
    measured = (raw - clean).var()
    assert measured == pytest.approx(predicted, rel=0.03)
    assert abs((raw - clean).mean()) < 0.05 * np.sqrt(predicted)  # unbiased


def test_ground_truth_is_noise_free_and_the_seed_decides_everything(tmp_path: Path) -> None:
    files, config = _sim(tmp_path)
    again, _ = _sim(tmp_path, name="again")
    other, _ = _sim(tmp_path, name="other", seed=1)
    assert files.raw.read_bytes() == again.raw.read_bytes()
    assert files.clean.read_bytes() == again.clean.read_bytes()
    assert not np.array_equal(tifffile.imread(files.raw), tifffile.imread(other.raw))
    # the clean file is exactly the detector-free signal, not a noisy draw
    photons = np.concatenate([p for _, p, _ in clean_chunks(config)])
    np.testing.assert_array_equal(tifffile.imread(files.clean),
                                  np.float32(config.offset) + np.float32(config.gain) * photons)


def test_a_longer_recording_starts_with_the_shorter_one(tmp_path: Path) -> None:
    short, _ = _sim(tmp_path, name="short", frames=100)
    long, _ = _sim(tmp_path, name="long", frames=300)  # generated in chunks of 64 frames
    np.testing.assert_array_equal(tifffile.imread(long.raw)[:100], tifffile.imread(short.raw))
    np.testing.assert_array_equal(np.load(long.traces)[:100], np.load(short.traces))


def test_neurons_are_rings_with_calcium_transients(tmp_path: Path) -> None:
    files, config = _sim(tmp_path, frames=600, size=(96, 96))
    truth = load_truth(files.truth)
    assert 8 <= len(truth.footprints) <= 20 and truth.config == config
    for fp in truth.footprints:
        h, w = fp.patch.shape
        if h == w and h > 9:  # not clipped by the border
            assert fp.patch[h // 2, w // 2] < 0.6 * fp.patch.max()  # dim nucleus, bright rim
    traces = np.load(files.traces)
    assert traces.shape == (600, len(truth.footprints)) and traces.min() >= 0
    active = traces.max(axis=0) > 0.25
    assert active.mean() > 0.5
    # GCaMP6f-like: a transient falls to a third of its peak within ~0.4–1 s
    i = int(np.argmax(traces.max(axis=0)))
    peak = int(np.argmax(traces[:, i]))
    after = traces[peak:peak + 60, i]
    below = np.nonzero(after < after[0] / 3)[0]
    assert below.size == 0 or 6 <= below[0] <= 60


@pytest.mark.parametrize("values", [{}, {"scene": "dense", "indicator": "slow"}],
                         ids=["somata-fast", "dense-slow"])
def test_the_spike_counts_are_the_spikes_behind_the_traces(tmp_path: Path,
                                                           values: dict) -> None:
    files, config = _sim(tmp_path, frames=150, **values)  # three chunks, the last one short
    counts = spike_counts(load_truth(files.truth).config)
    traces = np.load(files.traces)
    assert counts.shape == traces.shape and counts.min() >= 0
    assert np.array_equal(counts, np.round(counts)) and counts.sum() > 0
    # ΔF/F is each neuron's spikes through a rise-and-decay filter, scaled to its amplitude
    scene = make_scene(config)
    fr = config.frame_rate
    rise_s = RISE_TAU_S if config.indicator == "fast" else 0.15
    assert scene.rise_s == rise_s
    for i in range(counts.shape[1]):
        decay = signal.lfilter([1.0], [1.0, -np.exp(-1 / (scene.decay_s[i] * fr))], counts[:, i])
        rise = signal.lfilter([1.0], [1.0, -np.exp(-1 / (rise_s * fr))], counts[:, i])
        k = np.arange(int(fr * 20))
        h = np.exp(-k / (scene.decay_s[i] * fr)) - np.exp(-k / (rise_s * fr))
        np.testing.assert_allclose(traces[:, i], scene.amplitude[i] * (decay - rise) / h.max(),
                                   rtol=1e-4, atol=1e-5)
    other = spike_counts(SimulationConfig(**{**config.model_dump(), "seed": config.seed + 1}))
    assert not np.array_equal(other, counts)


def test_existing_files_are_kept_and_bad_options_are_one_line(tmp_path: Path) -> None:
    files, config = _sim(tmp_path)
    before = files.raw.read_bytes()
    with pytest.raises(OutputExistsError):
        simulate(tmp_path / "s", config)
    assert files.raw.read_bytes() == before
    assert_clean_error(run_cli("simulate", "-o", str(tmp_path / "s"), "--frames", "10"),
                       "already exists")
    assert_clean_error(run_cli("simulate", "-o", str(tmp_path / "x"), "--size", "8,8"),
                       "at least 16")
    assert_clean_error(run_cli("simulate", "-o", str(tmp_path / "x"), "--photons", "-1"),
                       "photons")
    assert_clean_error(run_cli("simulate", "-o", str(tmp_path / "none" / "x")),
                       "does not exist")
    result = run_cli("simulate", "-o", str(tmp_path / "cli"), "--frames", "40", "--size",
                     "32,32", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert tifffile.imread(tmp_path / "cli.tif").shape == (40, 32, 32)


def test_offset_subtracted_samples_are_clipped_at_zero_and_lines_drop_out(tmp_path: Path
                                                                         ) -> None:
    """As a microscope's software stores them: the baseline gone, negatives clipped (so dim
    pixels hold many zeros and their mean lies above the truth), a few lines of zeros; the
    same photons as the ordinary recording, and a clean recording without baseline."""
    plain, config = _sim(tmp_path, photons=0.3)
    files, clipped = _sim(tmp_path, name="c", photons=0.3, subtract_offset=True, dropouts=0.02)
    raw = tifffile.imread(files.raw).astype(np.float64)
    clean = tifffile.imread(files.clean).astype(np.float64)
    np.testing.assert_allclose(clean, tifffile.imread(plain.clean) - config.offset, atol=1e-3)
    assert clipped.baseline == 0 and config.baseline == config.offset
    assert (raw == 0).mean() > 0.3  # at 0.3 photons most samples hold none
    lines = (raw == 0).all(axis=2)
    assert 0.01 < lines.mean() < 0.04  # about the 2 % asked for
    kept = ~lines[:, :, None].repeat(raw.shape[2], axis=2)
    assert raw[kept].mean() > clean[kept].mean()  # read noise clipped at zero lifts the mean
    assert run_cli("simulate", "-o", str(tmp_path / "cli"), "--frames", "20", "--size",
                   "32,32", "--subtract-offset", "--dropouts", "0.1").returncode == 0
    assert load_truth(tmp_path / "cli_truth.npz").config.subtract_offset


def test_the_dense_scene_is_harder_and_all_of_it_has_ground_truth(tmp_path: Path) -> None:
    """Twice the somata, irregular and packed; thin neurites with their own activity; slow
    bleaching; every frame moved a little; the ΔF/F truth of every footprint kept."""
    plain, _ = _sim(tmp_path, size=(96, 96), frames=300)
    dense, config = _sim(tmp_path, name="d", size=(96, 96), frames=300, scene="dense")
    somata, truth = load_truth(plain.truth), load_truth(dense.truth)
    assert len(truth.somata) > 1.6 * len(somata.footprints)
    assert truth.kinds is not None and (truth.kinds == 1).sum() >= 4
    assert somata.somata == somata.footprints  # the default scene: all somata
    neurites = [fp for fp, k in zip(truth.footprints, truth.kinds, strict=True) if k == 1]
    assert all(min(fp.patch.shape) >= 9 and (fp.patch > 0.5).mean() < 0.35 for fp in neurites)
    traces = np.load(dense.traces)
    assert traces.shape == (300, len(truth.footprints))
    assert (traces[:, truth.kinds == 1].max(axis=0) > 0.1).all()  # neurites are active
    clean = tifffile.imread(dense.clean).astype(np.float64) - config.offset
    assert clean[-50:].mean() < 0.99 * clean[:50].mean()  # bleaching
    # motion: the same scene without the jitter differs frame by frame, by sub-pixel moves
    simulation = importlib.import_module("deepcad_chunked.simulate")
    moved = np.concatenate([c for _, c, _ in clean_chunks(config)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulation, "JITTER_PX", 0.0)
        still = np.concatenate([c for _, c, _ in clean_chunks(config)])
    change = np.abs(moved - still).mean(axis=(1, 2)) / still.mean()
    assert (change > 0.005).mean() > 0.9 and change.max() < 0.5
    assert np.corrcoef(moved.mean(0).ravel(), still.mean(0).ravel())[0, 1] > 0.97
    assert run_cli("simulate", "-o", str(tmp_path / "cli"), "--frames", "20", "--size",
                   "32,32", "--scene", "dense", "--indicator", "slow").returncode == 0


def test_the_slow_indicator_has_longer_transients(tmp_path: Path) -> None:
    fast, _ = _sim(tmp_path, frames=600, size=(48, 48))
    slow, _ = _sim(tmp_path, name="slow", frames=600, size=(48, 48), indicator="slow")

    def decorrelation(traces: np.ndarray) -> float:
        x = traces - traces.mean(0)
        lag = 15  # half a second at 30 Hz
        return float((x[lag:] * x[:-lag]).sum() / (x * x).sum())

    assert decorrelation(np.load(slow.traces)) > decorrelation(np.load(fast.traces)) + 0.15
