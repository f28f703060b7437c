"""Whole-recording statistics, accumulated block by block and merged in any order.

Integers of at most 16 bits are counted in an exact histogram, so their percentiles are exact.
Other dtypes keep a quantile sketch per block (1025 evenly spaced quantiles); sketches are
merged through their sample-weighted, piecewise-linear CDFs, so percentiles come out within about
1/1024 of the rank.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepcad_chunked.store.location import StorePath, write_atomic

PERCENTILES = (0.1, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.9)
_SKETCH_POINTS = 1025
_SKETCHES_KEPT = 32


def _exact_histogram(dtype: np.dtype) -> bool:
    return dtype.kind in "iub" and dtype.itemsize <= 2


@dataclass
class BlockStats:
    """Mergeable summary of some of a recording's samples.

    Attributes
    ----------
    count : int
        Number of finite samples.
    mean, m2 : float
        Mean and sum of squared deviations from it (Chan et al.'s parallel update).
    minimum, maximum : float
        Extremes of the finite samples.
    nonfinite : int
        Number of NaN or infinite samples (left out of everything else).
    histogram : numpy.ndarray or None
        Exact counts per value for integers of at most 16 bits (offset by the dtype minimum).
    sketches : list of (numpy.ndarray, int)
        Quantile sketches with the number of samples each summarises, for other dtypes.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    nonfinite: int = 0
    histogram: np.ndarray | None = None
    sketches: list[tuple[np.ndarray, int]] = field(default_factory=list)

    @classmethod
    def of(cls, block: np.ndarray) -> BlockStats:
        """Summarise one block of samples."""
        dtype = block.dtype
        flat = block.reshape(-1)
        if _exact_histogram(dtype):
            return cls._of_histogram(flat)
        stats = cls()
        if dtype.kind == "f":
            finite = np.isfinite(flat)
            stats.nonfinite = int(flat.size - np.count_nonzero(finite))
            if stats.nonfinite:
                flat = flat[finite]
        if flat.size == 0:
            return stats
        stats.count = int(flat.size)
        stats.mean = float(np.mean(flat, dtype=np.float64))
        stats.m2 = float(np.var(flat, dtype=np.float64)) * stats.count
        stats.minimum = float(flat.min())
        stats.maximum = float(flat.max())
        q = np.linspace(0.0, 1.0, _SKETCH_POINTS)
        stats.sketches = [(np.quantile(flat.astype(np.float64), q), stats.count)]
        return stats

    @classmethod
    def _of_histogram(cls, flat: np.ndarray) -> BlockStats:
        """Exact summary of small integers: one histogram, everything else derived from it."""
        dtype = flat.dtype
        offset = int(np.iinfo(dtype).min) if dtype.kind == "i" else 0
        bins = 1 << (8 * dtype.itemsize)
        hist = np.zeros(bins, dtype=np.int64)
        step = 1 << 18  # pieces that stay in cache while bincount widens them to intp
        for i in range(0, flat.size, step):
            piece = flat[i:i + step]
            if offset:
                piece = piece.view(np.uint8 if dtype.itemsize == 1 else np.uint16) ^ (
                    np.uint8(0x80) if dtype.itemsize == 1 else np.uint16(0x8000))
            hist += np.bincount(piece, minlength=bins)
        stats = cls(histogram=hist)
        nz = np.flatnonzero(hist)
        if nz.size:
            stats.count = int(flat.size)
            stats.minimum = float(nz[0] + offset)
            stats.maximum = float(nz[-1] + offset)
            values = np.arange(bins, dtype=np.float64) + offset
            stats.mean = float(np.dot(values, hist) / stats.count)
            stats.m2 = float(np.dot((values - stats.mean) ** 2, hist))
        return stats

    def merge(self, other: BlockStats) -> BlockStats:
        """Fold ``other`` into this summary (in place) and return it."""
        if other.count:
            total = self.count + other.count
            delta = other.mean - self.mean
            self.m2 += other.m2 + delta * delta * self.count * other.count / total
            self.mean += delta * other.count / total
            self.count = total
            self.minimum = min(self.minimum, other.minimum)
            self.maximum = max(self.maximum, other.maximum)
        self.nonfinite += other.nonfinite
        if other.histogram is not None:
            self.histogram = (other.histogram.copy() if self.histogram is None
                              else self.histogram + other.histogram)
        self.sketches.extend(other.sketches)
        if len(self.sketches) > _SKETCHES_KEPT:
            self.sketches = [(self._quantiles(np.linspace(0.0, 1.0, _SKETCH_POINTS)),
                              sum(n for _, n in self.sketches))]
        return self

    def _quantiles(self, q: np.ndarray) -> np.ndarray:
        """Invert the merged CDF of the sketches at probabilities ``q``."""
        grid = np.unique(np.concatenate([s for s, _ in self.sketches]))
        levels = np.linspace(0.0, 1.0, _SKETCH_POINTS)
        total = sum(n for _, n in self.sketches)
        cdf = sum(n * np.interp(grid, s, levels) for s, n in self.sketches) / total
        return np.interp(q, cdf, grid)

    def percentiles(self, dtype: np.dtype, points: tuple[float, ...] = PERCENTILES
                    ) -> dict[str, float]:
        """Percentiles of the samples seen (lower nearest rank for exact histograms)."""
        if not self.count:
            return {}
        if self.histogram is not None:
            offset = int(np.iinfo(dtype).min) if dtype.kind == "i" else 0
            cum = np.cumsum(self.histogram)
            ranks = [max(1, int(np.ceil(p / 100.0 * self.count))) for p in points]
            values = np.searchsorted(cum, ranks) + offset
        else:
            values = self._quantiles(np.asarray(points) / 100.0)
        return {_label(p): float(v) for p, v in zip(points, values, strict=True)}

    def _exact_moments(self, dtype: np.dtype) -> tuple[float, float]:
        """Mean and standard deviation from the histogram in integer arithmetic.

        Unlike the running moments, these do not depend on the order blocks were merged in,
        so a resumed conversion stores exactly the statistics of an uninterrupted one.
        """
        assert self.histogram is not None
        offset = int(np.iinfo(dtype).min) if dtype.kind == "i" else 0
        nz = np.flatnonzero(self.histogram)
        values = [int(v) + offset for v in nz]
        counts = [int(c) for c in self.histogram[nz]]
        n = sum(counts)
        s1 = sum(v * c for v, c in zip(values, counts, strict=True))
        s2 = sum(v * v * c for v, c in zip(values, counts, strict=True))
        return s1 / n, float(np.sqrt((n * s2 - s1 * s1) / (n * n)))

    def summary(self, dtype: np.dtype) -> dict[str, Any]:
        """JSON-ready statistics of the whole recording."""
        mean, std = self.mean, float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")
        if self.count and self.histogram is not None:
            mean, std = self._exact_moments(dtype)
        return {
            "count": self.count,
            "mean": mean,
            "std": std,
            "min": self.minimum,
            "max": self.maximum,
            "nonfinite": self.nonfinite,
            "percentiles": self.percentiles(dtype),
            "percentiles_exact": self.histogram is not None,
        }

    def save(self, path: StorePath) -> None:
        """Write to ``path`` (an ``.npz`` file, local or in an object store) atomically."""
        arrays: dict[str, np.ndarray] = {
            "scalars": np.array([self.mean, self.m2, self.minimum, self.maximum]),
            "counts": np.array([self.count, self.nonfinite], dtype=np.int64),
        }
        if self.histogram is not None:
            nz = np.flatnonzero(self.histogram)
            arrays["hist_index"] = nz.astype(np.int64)
            arrays["hist_count"] = self.histogram[nz].astype(np.int64)
            arrays["hist_size"] = np.array([self.histogram.size], dtype=np.int64)
        for k, (sketch, n) in enumerate(self.sketches):
            arrays[f"sketch_{k}"] = sketch
            arrays[f"sketch_n_{k}"] = np.array([n], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: StorePath) -> BlockStats:
        """Read what :meth:`save` wrote."""
        with np.load(io.BytesIO(path.read_bytes())) as data:
            mean, m2, lo, hi = (float(v) for v in data["scalars"])
            count, nonfinite = (int(v) for v in data["counts"])
            stats = cls(count=count, mean=mean, m2=m2, minimum=lo, maximum=hi,
                        nonfinite=nonfinite)
            if "hist_size" in data:
                hist = np.zeros(int(data["hist_size"][0]), dtype=np.int64)
                hist[data["hist_index"]] = data["hist_count"]
                stats.histogram = hist
            k = 0
            while f"sketch_{k}" in data:
                stats.sketches.append((data[f"sketch_{k}"], int(data[f"sketch_n_{k}"][0])))
                k += 1
        return stats


def _label(p: float) -> str:
    return f"p{p:g}"
