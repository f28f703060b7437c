"""Neuron detection as a yardstick: cells found in a recording against a simulation's neurons.

A detector's regions of interest (ROIs, sets of pixels) are matched one to one with the
ground-truth footprints by the largest total intersection over union (Hungarian assignment);
a pair counts as a hit when its IoU is at least the threshold (0.5, as in the DeepCAD paper's
Fig. 1). Precision is hits over ROIs found, recall hits over true neurons, F1 their harmonic
mean. :func:`suite2p_rois` runs Suite2p's cell detection (the optional ``[eval]`` extra) on a
movie held in memory.

Spike inference is scored on the true footprints, so that it measures the traces a recording
gives and not the detector: :func:`footprint_traces` reads each neuron's fluorescence,
:func:`oasis_spikes` deconvolves it with Suite2p's OASIS, and :func:`spike_correlation`
compares the result with the spikes the simulation fired
(:func:`~deepcad_chunked.simulate.spike_counts`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from deepcad_chunked.errors import SourceError
from deepcad_chunked.simulate import Footprint

log = logging.getLogger(__name__)

#: Share of a footprint's peak weight above which a pixel belongs to the true neuron.
FOOTPRINT_LEVEL = 0.2


@dataclass(frozen=True)
class Detection:
    """How well a set of ROIs matches the true neurons.

    Attributes
    ----------
    found, true, hits : int
        ROIs found, true neurons, and pairs matched with IoU at or above ``iou``.
    precision, recall, f1 : float
    iou : float
        The threshold.
    mean_iou : float
        Mean IoU of the hits (NaN without hits).
    """

    found: int
    true: int
    hits: int
    precision: float
    recall: float
    f1: float
    iou: float
    mean_iou: float


def footprint_masks(footprints: Sequence[Footprint], shape: tuple[int, int],
                    level: float = FOOTPRINT_LEVEL) -> list[np.ndarray]:
    """Each neuron's pixels (boolean frames): weight at least ``level`` of its peak."""
    masks = []
    for fp in footprints:
        mask = np.zeros(shape, bool)
        region = fp.region()
        mask[region] = fp.patch >= level * float(fp.patch.max())
        masks.append(mask)
    return masks


def iou_matrix(found: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> np.ndarray:
    """Intersection over union of every found mask (rows) with every true one (columns)."""
    if not found or not true:
        return np.zeros((len(found), len(true)))
    a = np.stack([m.ravel() for m in found]).astype(np.float32)
    b = np.stack([m.ravel() for m in true]).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match(found: Sequence[np.ndarray], true: Sequence[np.ndarray], iou: float = 0.5
          ) -> Detection:
    """Match found ROIs with true neurons one to one and count the hits.

    Parameters
    ----------
    found, true : sequence of boolean arrays
        Masks of the same frame shape.
    iou : float
        Smallest intersection over union of a hit.

    Returns
    -------
    Detection
    """
    scores = iou_matrix(found, true)
    rows, cols = linear_sum_assignment(-scores) if scores.size else ([], [])
    good = [scores[r, c] for r, c in zip(rows, cols, strict=True) if scores[r, c] >= iou]
    hits = len(good)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return Detection(len(found), len(true), hits, precision, recall, f1, iou,
                     float(np.mean(good)) if good else float("nan"))


def _require_suite2p() -> None:
    """Import Suite2p, or say in one line how to get it (or why it does not load)."""
    from deepcad_chunked.sources.reader import require

    try:
        require("suite2p", "eval", "neuron detection")
    except RuntimeError as exc:  # a compiled dependency that does not load
        raise SourceError(f"Suite2p is installed but cannot be imported: {exc}".splitlines()[0]
                          ) from None


def suite2p_rois(movie: np.ndarray, *, frame_rate: float, diameter: float,
                 tau: float = 0.7, settings: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Run Suite2p's cell detection on a ``(t, y, x)`` movie; the masks of the ROIs it finds.

    Suite2p's own detection (``suite2p.detection_wrapper``, its default ``sparsery``
    algorithm and settings) runs on the movie as given, taken as registered; each ROI's mask
    leaves out the pixels it shares with other ROIs, as Suite2p's extraction does.

    Parameters
    ----------
    movie : numpy.ndarray
        Frames in any real dtype.
    frame_rate : float
        Frames per second.
    diameter : float
        Expected cell diameter in pixels (Suite2p's ``diameter``).
    tau : float
        Decay time of the indicator in seconds (Suite2p's ``tau``; 0.7 for GCaMP6f).
    settings : dict, optional
        Detection settings to change (Suite2p's names, e.g. ``threshold_scaling``).

    Raises
    ------
    SourceError
        When Suite2p is not installed (``pip install deepcad-chunked[eval]``), or cannot be
        imported (its torchvision built for another torch, say).
    """
    _require_suite2p()
    import torch
    from suite2p import default_settings
    from suite2p.detection import detection_wrapper

    options = {**default_settings()["detection"], **(settings or {})}
    try:
        _, stats, _ = detection_wrapper(np.asarray(movie, dtype=np.float32),
                                        diameter=[float(diameter)] * 2, tau=tau, fs=frame_rate,
                                        settings=options, device=torch.device("cpu"))
    except ValueError as exc:  # Suite2p's way of saying it found nothing
        if "no ROIs were found" not in str(exc):
            raise
        stats = []
    masks = []
    for stat in stats:
        keep = ~np.asarray(stat["overlap"], bool)
        mask = np.zeros(movie.shape[1:], bool)
        mask[np.asarray(stat["ypix"])[keep], np.asarray(stat["xpix"])[keep]] = True
        masks.append(mask)
    log.info("Suite2p found %d ROIs", len(masks))
    return masks


def footprint_traces(movie: np.ndarray, footprints: Sequence[Footprint]) -> np.ndarray:
    """Each neuron's fluorescence: the footprint-weighted mean of the movie, neurons × frames.

    Parameters
    ----------
    movie : numpy.ndarray
        ``(t, y, x)`` frames.
    footprints : sequence of Footprint
        The simulation's neurons (``load_truth(path).footprints``).
    """
    traces = np.empty((len(footprints), movie.shape[0]), np.float32)
    for i, fp in enumerate(footprints):
        weights = fp.patch / float(fp.patch.sum())
        traces[i] = np.einsum("tyx,yx->t", movie[(slice(None), *fp.region())], weights,
                              dtype=np.float64)
    return traces


def oasis_spikes(traces: np.ndarray, *, frame_rate: float, tau: float = 0.7,
                 window_s: float = 60.0) -> np.ndarray:
    """Suite2p's spike deconvolution (OASIS) of fluorescence traces, neurons × frames.

    Suite2p's own pipeline for it: a running maximin baseline (Gaussian σ 10 frames, window
    ``window_s``) is subtracted, then OASIS infers non-negative spiking activity.

    Raises
    ------
    SourceError
        When Suite2p is missing or cannot be imported, as :func:`suite2p_rois`.
    """
    _require_suite2p()
    import torch
    from suite2p.extraction.dcnv import oasis, preprocess

    flat = preprocess(np.array(traces, np.float32), "maximin", window_s, 10.0, frame_rate,
                      device=torch.device("cpu"))
    return oasis(flat, batch_size=100, tau=tau, fs=frame_rate)


def spike_correlation(inferred: np.ndarray, spikes: np.ndarray, smooth: float = 1.0,
                      lag: int = 0) -> np.ndarray:
    """Pearson correlation of inferred activity with the true spikes, per neuron.

    Both are smoothed in time by a Gaussian of ``smooth`` frames first, so that a spike
    placed one frame off still counts partly (the usual measure of spike inference, after the
    spikefinder benchmark's 40 ms bins). NaN for a neuron without spikes or without activity.
    The measure is steep in the alignment: a whole frame off costs about a quarter of the
    correlation, so ``lag`` must say where the truth's spikes show.

    Parameters
    ----------
    inferred : numpy.ndarray
        Neurons × frames.
    spikes : numpy.ndarray
        Neurons × frames, the true spike counts.
    smooth : float
        Gaussian σ in frames (0: none).
    lag : int
        Frames from a true spike to the first frame its fluorescence shows, where a
        deconvolution places it: ``inferred[:, t + lag]`` is compared with ``spikes[:, t]``
        (the last ``lag`` frames of both are left out). For the simulations,
        :data:`~deepcad_chunked.simulate.SPIKE_LAG`.
    """
    from scipy.ndimage import gaussian_filter1d

    a = np.asarray(inferred, np.float64)
    b = np.asarray(spikes, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"inferred {a.shape} and true spikes {b.shape} differ in shape")
    if lag < 0 or lag >= a.shape[-1]:
        raise ValueError(f"lag {lag} is not within the {a.shape[-1]} frames")
    a, b = a[:, lag:], b[:, :b.shape[1] - lag]
    if smooth:
        a = gaussian_filter1d(a, smooth, axis=1, mode="nearest")
        b = gaussian_filter1d(b, smooth, axis=1, mode="nearest")
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(axis=1) / norm, np.nan)


@dataclass(frozen=True)
class Dynamics:
    """How a movie keeps the calcium transients of a simulation's neurons.

    Attributes
    ----------
    amplitude_ratio : numpy.ndarray
        Per neuron with transients: the movie's mean ΔF over the frames where the noise-free
        movie's ΔF is at least half its peak, over the noise-free movie's (1: kept; below:
        peaks flattened or intensities lowered).
    rise_s, decay_s : float
        The movie's population transient after an isolated spike: 10–90 % rise time and
        time from the peak down to 1/e of it, in seconds.
    true_rise_s, true_decay_s : float
        The same of the noise-free movie.
    """

    amplitude_ratio: np.ndarray
    rise_s: float
    decay_s: float
    true_rise_s: float
    true_decay_s: float

    @property
    def rise_error_ms(self) -> float:
        """Rise time error, ms."""
        return 1000 * (self.rise_s - self.true_rise_s)

    @property
    def decay_error_ms(self) -> float:
        """Decay time error, ms."""
        return 1000 * (self.decay_s - self.true_decay_s)


def _triggered(traces: np.ndarray, onsets: list[tuple[int, int]], before: int, after: int
               ) -> np.ndarray:
    """The mean of ``traces[neuron, onset - before : onset + after]`` over the onsets."""
    return np.mean([traces[i, t - before:t + after] for i, t in onsets], axis=0)


def _shape_times(curve: np.ndarray, before: int, frame_rate: float) -> tuple[float, float]:
    """10–90 % rise time and peak-to-1/e decay time of a triggered average, in seconds."""
    base = float(curve[:before].mean())
    y = curve - base
    peak = int(np.argmax(y[before:])) + before
    top = float(y[peak])
    if top <= 0:
        return math.nan, math.nan
    rising = y[before:peak + 1]
    t10 = before + int(np.argmax(rising >= 0.1 * top))
    t90 = before + int(np.argmax(rising >= 0.9 * top))
    falling = y[peak:]
    below = np.nonzero(falling <= top / math.e)[0]
    decay = int(below[0]) if len(below) else len(falling)
    return (t90 - t10) / frame_rate, decay / frame_rate


def transient_dynamics(movie: np.ndarray, clean: np.ndarray, footprints: Sequence[Footprint],
                       spikes: np.ndarray, *, frame_rate: float, offset: float = 0.0,
                       quiet_s: float = 1.0, after_s: float = 3.0) -> Dynamics:
    """Transient amplitudes and kinetics of a movie against the noise-free one.

    Both movies are read through the true footprints (:func:`footprint_traces`) with the
    noise-free trace's baseline (its 20th percentile) as F₀ for both, so that a movie that
    lowers intensities lowers its ΔF as well. The kinetics come from the population average
    of each trace, scaled by its neuron's noise-free peak, after every spike preceded by
    ``quiet_s`` without spikes.

    Parameters
    ----------
    movie, clean : numpy.ndarray
        ``(t, y, x)``: the movie scored and the simulation's noise-free one.
    footprints : sequence of Footprint
    spikes : numpy.ndarray
        Neurons × frames, the true spike counts.
    frame_rate : float
    offset : float
        The detector's baseline in the noise-free movie (not fluorescence): a neuron counts
        when its noise-free peak ΔF is at least 10 % of its resting fluorescence.
    quiet_s, after_s : float
        Spike-free time before an onset, and the length of the averaged transient.

    Returns
    -------
    Dynamics
    """
    est = footprint_traces(movie, footprints).astype(np.float64)
    true = footprint_traces(clean, footprints).astype(np.float64)
    f0 = np.percentile(true, 20, axis=1, keepdims=True)
    d_est, d_true = est - f0, true - f0
    ratios = []
    for a, b, base in zip(d_est, d_true, f0[:, 0], strict=True):
        if b.max() < 0.1 * max(base - offset, 1e-9):
            continue  # no transient worth the name
        top = b >= 0.5 * b.max()
        ratios.append(float(a[top].mean() / b[top].mean()))
    before, after = max(2, round(0.2 * frame_rate)), round(after_s * frame_rate)
    quiet = round(quiet_s * frame_rate)
    onsets = [(i, t) for i, t in zip(*np.nonzero(spikes > 0), strict=True)
              if t >= max(quiet, before) and t + after <= spikes.shape[1]
              and not spikes[i, t - quiet:t].any()]
    peaks = np.maximum(d_true.max(axis=1, keepdims=True), 1e-9)
    if onsets:
        rise, decay = _shape_times(_triggered(d_est / peaks, onsets, before, after), before,
                                   frame_rate)
        true_rise, true_decay = _shape_times(_triggered(d_true / peaks, onsets, before, after),
                                             before, frame_rate)
    else:
        rise = decay = true_rise = true_decay = math.nan
    return Dynamics(np.array(ratios), rise, decay, true_rise, true_decay)
