"""Whole-recording statistics merged from blocks equal those of the whole array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepcad_chunked.store.stats import PERCENTILES, BlockStats
from tests.tiffs import movie


def _blockwise(data: np.ndarray, step: int, order: list[int] | None = None) -> BlockStats:
    blocks = [data[t:t + step] for t in range(0, data.shape[0], step)]
    total = BlockStats()
    for k in order or range(len(blocks)):
        total.merge(BlockStats.of(blocks[k]))
    return total


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
def test_integer_statistics_are_exact(dtype: str) -> None:
    data = movie((23, 17, 19), dtype)
    s = _blockwise(data, 5).summary(data.dtype)
    assert s["count"] == data.size
    assert s["mean"] == pytest.approx(data.mean(dtype=np.float64), rel=1e-12)
    assert s["std"] == pytest.approx(data.std(dtype=np.float64), rel=1e-12)
    assert (s["min"], s["max"]) == (data.min(), data.max())
    assert s["percentiles_exact"]
    for p in PERCENTILES:
        assert s["percentiles"][f"p{p:g}"] == np.percentile(data, p, method="inverted_cdf")


@pytest.mark.parametrize("dtype", ["float32", "int32", "uint32"])
def test_sketched_percentiles_are_close(dtype: str) -> None:
    rng = np.random.default_rng(1)
    data = rng.gamma(2.0, 50.0, size=(300, 20, 20)).astype(dtype)
    s = _blockwise(data, 4).summary(data.dtype)  # 75 blocks: sketches get merged on the way
    assert not s["percentiles_exact"]
    assert s["mean"] == pytest.approx(data.mean(dtype=np.float64), rel=1e-9)
    for p in (1.0, 50.0, 99.0):
        want = np.percentile(data.astype(np.float64), p)
        rank = np.mean(data <= s["percentiles"][f"p{p:g}"]) * 100
        assert abs(rank - p) < 0.5, (p, want, s["percentiles"][f"p{p:g}"])


def test_merge_order_does_not_matter() -> None:
    data = movie((40, 8, 8), "int16")
    a = _blockwise(data, 3).summary(data.dtype)
    b = _blockwise(data, 3, order=list(reversed(range(14)))).summary(data.dtype)
    assert a["percentiles"] == b["percentiles"]
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-12)
    assert a["std"] == pytest.approx(b["std"], rel=1e-12)


def test_nonfinite_values_are_counted_and_left_out() -> None:
    data = movie((6, 5, 5), "float32")
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    s = BlockStats.of(data).summary(data.dtype)
    assert s["nonfinite"] == 2
    assert s["count"] == data.size - 2
    assert np.isfinite(s["mean"]) and np.isfinite(s["max"])


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_save_and_load_round_trip(tmp_path: Path, dtype: str) -> None:
    data = movie((9, 7, 5), dtype)
    stats = BlockStats.of(data)
    stats.save(tmp_path / "s.npz")
    back = BlockStats.load(tmp_path / "s.npz")
    assert back.summary(data.dtype) == stats.summary(data.dtype)
    assert not (tmp_path / "s.npz.tmp").exists()
