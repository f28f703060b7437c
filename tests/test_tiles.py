"""Tile sampling, pairing and augmentation, each choice checked."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from deepcad_chunked.training.tiles import Region, draw, draw_window, make_pair, split_regions

TILE = (16, 8, 8)


def test_pairs_are_even_and_odd_frames_and_swap() -> None:
    tile = np.arange(16)[:, None, None] * np.ones((16, 8, 8))
    inp, tgt = make_pair(tile, swap=False, transform=0)
    assert list(inp[:, 0, 0]) == list(range(0, 16, 2))
    assert list(tgt[:, 0, 0]) == list(range(1, 16, 2))
    inp2, tgt2 = make_pair(tile, swap=True, transform=0)
    np.testing.assert_array_equal(inp2, tgt)
    np.testing.assert_array_equal(tgt2, inp)


def test_eight_distinct_transforms_applied_to_both_halves() -> None:
    rng = np.random.default_rng(0)
    tile = rng.random((4, 6, 6))
    results = set()
    for k in range(8):
        inp, tgt = make_pair(tile, swap=False, transform=k)
        results.add(inp.tobytes())
        np.testing.assert_array_equal(inp[0], _expected(tile[0], k))
        np.testing.assert_array_equal(tgt[0], _expected(tile[1], k))
        assert inp.flags["C_CONTIGUOUS"]
    assert len(results) == 8


def _expected(frame: np.ndarray, k: int) -> np.ndarray:
    out = np.rot90(frame, k % 4)
    return out[:, ::-1] if k >= 4 else out


def test_draws_cover_the_whole_time_axis_and_are_deterministic() -> None:
    region = [Region(0, (), (0, 5000), (0, 8), (0, 8))]
    starts = [draw(7, i, region, TILE).t0 for i in range(20000)]
    assert min(starts) == 0 and max(starts) == 5000 - 16
    counts, _ = np.histogram(starts, bins=10, range=(0, 4985))
    assert counts.min() > 0.8 * counts.mean()  # uniform, not only the first frames
    assert [draw(7, i, region, TILE) for i in range(50)] == \
        [draw(7, i, region, TILE) for i in range(50)]
    assert draw(7, 3, region, TILE) != draw(8, 3, region, TILE)


def test_swaps_and_transforms_are_drawn_evenly() -> None:
    region = [Region(0, (), (0, 100), (0, 64), (0, 64))]
    draws = [draw(0, i, region, TILE) for i in range(4000)]
    assert 0.45 < np.mean([d.swap for d in draws]) < 0.55
    counts = np.bincount([d.transform for d in draws], minlength=8)
    assert counts.min() > 400
    plain = [draw(0, i, region, TILE, augment=False) for i in range(50)]
    assert not any(d.swap or d.transform for d in plain)


def test_non_square_tiles_get_no_quarter_turns() -> None:
    region = [Region(0, (), (0, 100), (0, 64), (0, 64))]
    used = {draw(0, i, region, (16, 8, 16)).transform for i in range(500)}
    assert used == {0, 2, 4, 6}


def test_recordings_are_drawn_in_proportion_to_their_size() -> None:
    regions = [Region(0, (), (0, 116), (0, 8), (0, 8)), Region(1, (), (0, 316), (0, 8), (0, 8))]
    picks = np.array([draw(1, i, regions, TILE).recording for i in range(6000)])
    assert np.mean(picks == 1) == pytest.approx(301 / (301 + 101), abs=0.03)


def test_validation_is_held_out_in_time() -> None:
    train, val = split_regions([(1000, 32, 32)], TILE, 0.05)
    assert train[0].t == (0, 950) and val[0].t == (950, 1000)
    train, val = split_regions([(100, 32, 32)], TILE, 0.05)
    assert val[0].t[1] - val[0].t[0] == 16  # at least one tile
    assert train[0].t[1] <= val[0].t[0]


def test_short_recording_falls_back_to_spatial_hold_out(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        train, val = split_regions([(20, 32, 32)], TILE, 0.05)
    assert "columns" in caplog.text
    assert train[0].x[1] <= val[0].x[0] and val[0].positions(TILE) > 0
    assert train[0].positions(TILE) > 0
    with caplog.at_level(logging.WARNING):
        train, val = split_regions([(20, 8, 8)], TILE, 0.05)
    assert "training data" in caplog.text and train == val


def test_planes_of_a_volume_are_separate_series() -> None:
    train, _ = split_regions([(100, 2, 3, 16, 16)], TILE, 0.1)
    assert sorted(r.plane for r in train) == [(c, z) for c in range(2) for z in range(3)]


def test_windows_are_aligned_contain_a_tile_and_reach_both_ends() -> None:
    region = [Region(0, (), (0, 1000), (0, 300), (0, 300))]
    windows = [draw_window(5, k, region, TILE, [(32, 128, 128)]) for k in range(3000)]
    for w in windows[:200]:
        assert w.shape == (48, 136, 136)
        assert w.start[0] % 32 == 0 or w.start[0] + 48 == 1000
        assert w.start[1] % 128 == 0 or w.start[1] + 136 == 300
        d = draw(5, 7, region, TILE, window=w)
        assert w.start[0] <= d.t0 <= w.start[0] + 48 - 16
    assert min(w.start[0] for w in windows) == 0
    assert max(w.start[0] + w.shape[0] for w in windows) == 1000
