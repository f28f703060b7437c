"""The intensity calibration of a trained network: its output mapped so that intensities are kept.

A self-supervised network's optimum keeps every pixel's temporal mean (it estimates the
expected next frame), but a network trained for minutes is far from that optimum in a way its
loss hardly sees: on a real two-photon recording its response to a flat field was off by
-4 counts at 0 and by +1–2 % of the intensity at the top (a learned linear part whose gain
drifted from 1, the L1 half of DeepCAD's loss estimating the lower median of skewed counts).
Such an error costs well under 1 % of the loss but halves the intensity of pixels of 8 counts,
and ΔF/F = (F − F₀)/F₀ computed on them (``benchmarks/RESULTS.md``, "Intensities kept").

The calibration is a smooth, monotone correction of the network's output value,
``y + shift(y)`` with ``shift`` piecewise linear between knots (flat beyond them), fitted after
training on frames of the recording so that in every band of brightness the pixels' mean
equals that of the raw frames — a few parameters over thousands of pixels, so noise averages
out.
It is a function of one output voxel: chunked inference stays exactly the monolithic one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: Knots of the correction, at quantiles of the network's output.
KNOTS = 9
#: Bands of brightness whose means are matched.
BANDS = 32
#: Weight of the penalty on differences between neighbouring knots' shifts (per band).
SMOOTHNESS = 1e-2


@dataclass(frozen=True)
class Calibration:
    """``y + shift(y)``: the correction of a network's output, in its normalised units.

    Attributes
    ----------
    knots : tuple of float
        Increasing output values.
    shift : tuple of float
        What is added at each knot; linear in between, constant beyond the ends.
    """

    knots: tuple[float, ...]
    shift: tuple[float, ...]

    def __post_init__(self) -> None:
        k = np.asarray(self.knots, dtype=np.float64)
        if (len(k) < 2 or len(k) != len(self.shift) or not np.all(np.diff(k) > 0)
                or not np.all(np.isfinite(k)) or not np.all(np.isfinite(self.shift))):
            raise ValueError("a calibration needs at least two increasing finite knots and "
                             "one finite shift per knot")

    def apply(self, y: Any) -> Any:
        """The corrected output of ``y`` (numpy or dask, float32 kept)."""
        if hasattr(y, "map_blocks"):
            return y.map_blocks(self.apply, dtype=np.float32)
        knots = np.asarray(self.knots, dtype=np.float32)
        shift = np.asarray(self.shift, dtype=np.float32)
        return (y + np.interp(y, knots, shift).astype(np.float32)).astype(np.float32)

    def module(self) -> nn.Module:
        """The same correction as a torch module (sums of ReLUs: exportable to ONNX)."""
        return _PiecewiseShift(self)

    def span(self) -> tuple[float, float]:
        """Smallest and largest shift (normalised units)."""
        return float(min(self.shift)), float(max(self.shift))

    def as_dict(self) -> dict[str, list[float]]:
        """JSON-ready form, as checkpoints store it."""
        return {"knots": [float(v) for v in self.knots], "shift": [float(v) for v in self.shift]}

    @classmethod
    def from_dict(cls, value: Mapping[str, Iterable[float]]) -> Calibration:
        """Read :meth:`as_dict`'s form.

        Raises
        ------
        ValueError
            When it is not a valid calibration.
        """
        return cls(tuple(float(v) for v in value["knots"]),
                   tuple(float(v) for v in value["shift"]))


class _PiecewiseShift(nn.Module):
    """``y + shift(y)`` as ``y + s₀ + Σ (slope change) · relu(y − knot)``."""

    def __init__(self, calibration: Calibration) -> None:
        super().__init__()
        k = np.asarray(calibration.knots, dtype=np.float64)
        s = np.asarray(calibration.shift, dtype=np.float64)
        slopes = np.concatenate([[0.0], np.diff(s) / np.diff(k), [0.0]])
        self.register_buffer("knots", torch.tensor(k, dtype=torch.float32))
        self.register_buffer("changes", torch.tensor(np.diff(slopes), dtype=torch.float32))
        self.first = float(s[0])

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        ramps = torch.relu(y[..., None] - self.knots) * self.changes
        return y + self.first + ramps.sum(-1)


def output_calibration(normalization: Mapping[str, Any]) -> Calibration | None:
    """The calibration a checkpoint's normalisation carries (None: the output as it is)."""
    value = normalization.get("calibration")
    return None if value is None else Calibration.from_dict(value)


def _hat_means(outputs: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Per pixel, the temporal mean of each knot's hat function of the output:
    ``(pixels, knots)``, so that the mean of ``shift(y)`` is this times the knot shifts."""
    frames = outputs.shape[0]
    pixels = outputs[0].size
    k = len(knots)
    flat = np.arange(pixels) * k
    total = np.zeros(pixels * k)
    for frame in outputs.reshape(frames, pixels).astype(np.float64):
        idx = np.clip(np.searchsorted(knots, frame) - 1, 0, k - 2)
        lo, hi = knots[idx], knots[idx + 1]
        w = np.clip((frame - lo) / (hi - lo), 0.0, 1.0)
        total += np.bincount(flat + idx, weights=1.0 - w, minlength=pixels * k)
        total += np.bincount(flat + idx + 1, weights=w, minlength=pixels * k)
    return (total / frames).reshape(pixels, k)


def fit_calibration(outputs: Iterable[np.ndarray], inputs: Iterable[np.ndarray], *,
                    knots: int = KNOTS, bands: int = BANDS,
                    smoothness: float = SMOOTHNESS) -> Calibration:
    """Fit the correction that gives every band of brightness the mean intensity of its input.

    Parameters
    ----------
    outputs, inputs : iterables of numpy.ndarray
        Pairs of ``(t, y, x)`` samples: the network's output and the (normalised) frames it
        denoised, in the same units.
    knots : int
        Knots of the correction, placed at quantiles of the outputs.
    bands : int
        Bands of pixels of equal counts, by their input's temporal mean, whose mean output
        must equal their mean input.
    smoothness : float
        Penalty on the differences between neighbouring knots' shifts: the fit stays a gentle
        curve where few pixels lie.

    Returns
    -------
    Calibration

    Notes
    -----
    What is matched is what the intensity check measures: per band of the raw temporal mean,
    the mean of the denoised over that of the raw. Matching each pixel's own mean instead
    would learn a shrinkage toward the mean of every error the network makes at a pixel (a
    blurred fine structure, say), which no correction of the output value can undo and which
    costs SNR. The pixels are put in bands by the mean of the first half of each sample's
    frames and compared over the second half: the noise that placed a pixel in a band is not
    the noise it is compared with, which would otherwise show as a bias (bright bands too
    bright, dim bands too dark) that is not there.
    """
    pairs = [(np.asarray(o, dtype=np.float32), np.asarray(i, dtype=np.float32))
             for o, i in zip(outputs, inputs, strict=True)]
    if not pairs:
        raise ValueError("no samples to calibrate on")
    values = np.concatenate([o.ravel() for o, _ in pairs])
    grid = np.unique(np.quantile(values, np.linspace(0.0, 1.0, knots)).astype(np.float64))
    if len(grid) < 2:
        grid = np.array([grid[0] - 1.0, grid[0] + 1.0])
    rows, gaps, levels = [], [], []
    for out, inp in pairs:
        half = len(out) // 2 if len(out) >= 4 else 0
        seen, judged = slice(0, half or len(out)), slice(half, len(out))
        levels.append(inp[seen].mean(0, dtype=np.float64).ravel())
        rows.append(_hat_means(out[judged], grid))
        gaps.append((inp[judged].mean(0, dtype=np.float64)
                     - out[judged].mean(0, dtype=np.float64)).ravel())
    a, b = np.concatenate(rows), np.concatenate(gaps)
    groups = np.array_split(np.argsort(np.concatenate(levels), kind="stable"),
                            min(bands, len(b)))
    a_band = np.stack([a[g].mean(0) for g in groups])
    b_band = np.array([b[g].mean() for g in groups])
    diff = np.diff(np.eye(len(grid)), axis=0)
    lhs = (a_band.T @ a_band + smoothness * len(groups) * diff.T @ diff
           + 1e-9 * len(groups) * np.eye(len(grid)))
    theta = np.linalg.solve(lhs, a_band.T @ b_band)
    return Calibration(tuple(float(v) for v in grid), tuple(float(v) for v in theta))
