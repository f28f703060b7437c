"""How good a denoised recording is, measured out of core.

With ground truth (a simulation's clean recording and footprints): SNR and PSNR in dB, the gain
over the raw recording, the Pearson correlation of every neuron's trace with its clean trace,
and a baseline row for the best of a few 3D Gaussian filters (the classical method the DeepCAD
paper compares with). Without ground truth: the temporal standard deviation over a dark region
(given, or the darkest window of the mean image), the paper's model-selection criterion.

Every recording is read a chunk of frames at a time, from an OME-Zarr store or a TIFF file, so
recordings larger than memory can be evaluated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, sparse

from deepcad_chunked.errors import ConfigError, SourceError
from deepcad_chunked.simulate import Footprint, load_truth, output_paths
from deepcad_chunked.sources.registry import file_of, open_sources
from deepcad_chunked.sources.remote import is_http
from deepcad_chunked.store.location import RemotePath, resolve

log = logging.getLogger(__name__)

#: Gaussian filters (σ along t, σ along y and x, in frames and pixels) tried as the baseline.
GAUSSIANS: tuple[tuple[float, float], ...] = ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (8, 2))
#: Frames read at a time.
CHUNK = 64
#: Side of the window searched for the darkest region, in pixels.
DARK_WINDOW = 16


class Frames:
    """A ``(t, y, x)`` recording in an OME-Zarr store or any source format
    (:mod:`deepcad_chunked.sources.registry`: TIFF, HDF5, NWB, Suite2p), read by frame ranges."""

    def __init__(self, path: str | Path) -> None:
        from deepcad_chunked.store.omezarr import is_zarr_store
        from deepcad_chunked.store.recording import open_recording

        text = str(path)
        self.path = resolve(path)
        web = is_http(text)
        if not web and not (self.path.exists() if isinstance(self.path, RemotePath)
                            else Path(file_of(text)).exists()):
            raise SourceError(f"{self.path} does not exist")
        if not web and is_zarr_store(self.path):
            rec = open_recording(self.path)
            if rec.axes != ("t", "y", "x"):
                raise SourceError(f"{self.path} has axes {','.join(rec.axes)}; evaluation "
                                  "takes t,y,x recordings")
            self._array = rec.array
            self.shape = tuple(rec.shape)
            self._read = lambda a, b: np.asarray(self._array[a:b])
        elif isinstance(self.path, RemotePath) and not web:
            raise SourceError(f"{self.path}: source files are read from local paths or http(s) "
                              "URLs (stores may be any URL)")
        else:
            plan = open_sources([text])
            if plan.first.axes != ("t", "y", "x"):
                raise SourceError(f"{self.path} has more axes than t, y, x")
            self.shape = (plan.frames, *plan.first.frame_shape)
            self._read = plan.read

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` as float64."""
        return self._read(start, stop).astype(np.float64)


@dataclass
class _Accumulator:
    """Running sums for SNR, PSNR and per-neuron Pearson correlation of one estimate."""

    neurons: int
    sse: float = 0.0
    sums: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.sums = np.zeros((3, self.neurons))  # Σa, Σa², Σab (truth sums are shared)

    def add(self, estimate: np.ndarray, truth: np.ndarray, traces: np.ndarray | None,
            truth_traces: np.ndarray | None) -> None:
        self.sse += float(((estimate - truth) ** 2).sum())
        if traces is not None and truth_traces is not None:
            self.sums += [traces.sum(0), (traces**2).sum(0), (traces * truth_traces).sum(0)]


@dataclass(frozen=True)
class Row:
    """Scores of one estimate against the ground truth."""

    name: str
    snr_db: float
    psnr_db: float
    trace_r_mean: float | None
    trace_r_median: float | None


def _footprint_matrix(footprints: Sequence[Footprint], shape: tuple[int, int]
                      ) -> sparse.csr_matrix:
    """Weights (pixels × neurons) that turn a frame into each neuron's mean fluorescence."""
    rows, cols, values = [], [], []
    for i, fp in enumerate(footprints):
        ys, xs = np.nonzero(fp.patch > 0.05)
        w = fp.patch[ys, xs].astype(np.float64)
        rows.append((ys + fp.y) * shape[1] + xs + fp.x)
        cols.append(np.full(len(ys), i))
        values.append(w / w.sum())
    if not footprints:
        return sparse.csr_matrix((shape[0] * shape[1], 0))
    return sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows),
                                                       np.concatenate(cols))),
                             shape=(shape[0] * shape[1], len(footprints)))


def _gaussian(raw: np.ndarray, sigma: tuple[float, float], keep: slice) -> np.ndarray:
    return ndimage.gaussian_filter(raw, sigma=(sigma[0], sigma[1], sigma[1]),
                                   mode="reflect")[keep]


def _margin(sigmas: Sequence[tuple[float, float]]) -> int:
    return max((int(4.0 * s[0] + 0.5) for s in sigmas), default=0)


def score(denoised: str | Path, truth: str | Path, raw: str | Path | None = None, *,
          footprints: str | Path | None = None, offset: float | None = None,
          sigmas: Sequence[tuple[float, float]] = GAUSSIANS) -> dict[str, Any]:
    """Score a denoised recording (and the raw one and Gaussian filters) against ground truth.

    Parameters
    ----------
    denoised, truth, raw : str or Path
        Recordings (OME-Zarr stores or TIFF files) of the same shape; ``truth`` noise-free.
    footprints : str or Path, optional
        A simulation's ``_truth.npz``; default: the one beside a ``PREFIX_clean.tif`` truth.
    offset : float, optional
        Detector baseline removed from the truth before its power is taken for the SNR;
        default: the simulation's (from ``footprints``). Without either it is refused: an
        offset taken as 0 would overstate every SNR by as much as the baseline's power.
    sigmas : sequence of (σt, σyx)
        Gaussian filters of the baseline (applied to ``raw``).

    Returns
    -------
    dict
        ``rows`` (name, snr_db, psnr_db, trace_r_mean, trace_r_median), ``gain_db`` (SNR of
        the denoised minus the raw's), ``gain_over_gaussian_db``, ``best_gaussian``.

    Notes
    -----
    SNR = 10·log10(Σ(truth − offset)² / Σ(x − truth)²); PSNR = 10·log10(range² / MSE) with the
    truth's range. Traces are footprint-weighted means of every frame.
    """
    est, ref = Frames(denoised), Frames(truth)
    noisy = Frames(raw) if raw is not None else None
    for other in (ref, noisy):
        if other is not None and other.shape != est.shape:
            raise ConfigError(f"{other.path} has shape {other.shape} but {est.path} has "
                              f"{est.shape}")
    fps, sim_offset = _footprints(footprints, truth)
    if offset is None and sim_offset is None:
        raise ConfigError(f"the SNR needs the detector offset (baseline) of {ref.path}, which "
                          "a simulation's PREFIX_truth.npz gives and none was found beside it: "
                          "give --footprints TRUTH.npz, or --offset VALUE (0 when the clean "
                          "recording has no baseline)")
    offset = sim_offset if offset is None else offset
    weights = _footprint_matrix(fps, est.shape[1:]) if fps else None
    n = len(fps)
    names = ["denoised"] + (["raw", *(f"gaussian σt={s[0]:g} σyx={s[1]:g}" for s in sigmas)]
                            if noisy else [])
    acc = {name: _Accumulator(n) for name in names}
    truth_sums = np.zeros((2, n))
    power, low, high = 0.0, math.inf, -math.inf
    margin = _margin(sigmas) if noisy else 0
    frames = est.shape[0]
    for start in range(0, frames, CHUNK):
        stop = min(frames, start + CHUNK)
        clean = ref.read(start, stop)
        power += float(((clean - offset) ** 2).sum())
        low, high = min(low, float(clean.min())), max(high, float(clean.max()))
        estimates = {"denoised": est.read(start, stop)}
        if noisy is not None:
            a, b = max(0, start - margin), min(frames, stop + margin)
            wide = noisy.read(a, b)
            keep = slice(start - a, start - a + stop - start)
            estimates["raw"] = wide[keep]
            for name, sigma in zip(names[2:], sigmas, strict=True):
                estimates[name] = _gaussian(wide, sigma, keep)
        truth_traces = _traces(clean, weights)
        if truth_traces is not None:
            truth_sums += [truth_traces.sum(0), (truth_traces**2).sum(0)]
        for name, x in estimates.items():
            acc[name].add(x, clean, _traces(x, weights), truth_traces)
    voxels = math.prod(est.shape)
    if power <= 0 or high <= low:
        raise ConfigError(f"{ref.path} is constant (or holds nothing above the offset "
                          f"{offset:g}): it has no signal to take an SNR against")
    rows = [_row(name, a, power, voxels, high - low, truth_sums, frames)
            for name, a in acc.items()]
    result: dict[str, Any] = {"denoised": str(est.path), "truth": str(ref.path),
                              "raw": str(noisy.path) if noisy else None, "offset": offset,
                              "neurons": n, "rows": [asdict(r) for r in rows]}
    if noisy is not None:
        by = {r.name: r for r in rows}
        best = max(rows[2:], key=lambda r: r.snr_db)
        result.update(gain_db=by["denoised"].snr_db - by["raw"].snr_db,
                      best_gaussian=best.name,
                      gain_over_gaussian_db=by["denoised"].snr_db - best.snr_db)
    return result


def _footprints(footprints: str | Path | None, truth: str | Path
                ) -> tuple[list[Footprint], float | None]:
    if footprints is None:
        name = Path(truth).name
        if name.endswith("_clean.tif"):
            guess = output_paths(Path(truth).with_name(name[: -len("_clean.tif")])).truth
            if guess.is_file():
                footprints = guess
    if footprints is None:
        return [], None
    loaded = load_truth(footprints)
    return loaded.footprints, loaded.config.baseline


def _traces(frames: np.ndarray, weights: sparse.csr_matrix | None) -> np.ndarray | None:
    if weights is None:
        return None
    return np.asarray(frames.reshape(frames.shape[0], -1) @ weights)


def _row(name: str, acc: _Accumulator, power: float, voxels: int, span: float,
         truth_sums: np.ndarray, frames: int) -> Row:
    snr = 10 * math.log10(power / max(acc.sse, 1e-300))
    psnr = 10 * math.log10(span**2 / max(acc.sse / voxels, 1e-300))
    r_mean = r_median = None
    if acc.neurons:
        sa, saa, sab = acc.sums
        sb, sbb = truth_sums
        cov = sab - sa * sb / frames
        var = (saa - sa**2 / frames) * (sbb - sb**2 / frames)
        r = np.where(var > 0, cov / np.sqrt(np.maximum(var, 1e-300)), np.nan)
        r_mean, r_median = float(np.nanmean(r)), float(np.nanmedian(r))
    return Row(name, snr, psnr, r_mean, r_median)


def darkest_region(image: np.ndarray, size: int = DARK_WINDOW) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the ``size``×``size`` window with the lowest mean."""
    size = min(size, *image.shape)
    means = ndimage.uniform_filter(image.astype(np.float64), size=size, mode="nearest")
    half = size // 2
    inner = means[half:image.shape[0] - (size - half) + 1, half:image.shape[1] - (size - half) + 1]
    y, x = np.unravel_index(int(np.argmin(inner)), inner.shape)
    return int(y), int(y) + size, int(x), int(x) + size


def mean_image(recording: Frames) -> np.ndarray:
    """The mean over time of every pixel."""
    total = np.zeros(recording.shape[1:])
    for start in range(0, recording.shape[0], CHUNK):
        total += recording.read(start, min(recording.shape[0], start + CHUNK)).sum(0)
    return total / recording.shape[0]


def temporal_std(recording: Frames, region: tuple[int, int, int, int]) -> float:
    """Mean over the pixels of ``region`` of their standard deviation over time."""
    y0, y1, x0, x1 = region
    count, mean, m2 = 0, np.zeros((y1 - y0, x1 - x0)), np.zeros((y1 - y0, x1 - x0))
    for start in range(0, recording.shape[0], CHUNK):
        part = recording.read(start, min(recording.shape[0], start + CHUNK))[:, y0:y1, x0:x1]
        m, part_mean = len(part), part.mean(0)
        delta = part_mean - mean  # Chan et al.: merge the chunk's mean and sum of squares
        mean = mean + delta * m / (count + m)
        m2 = m2 + ((part - part_mean) ** 2).sum(0) + delta**2 * count * m / (count + m)
        count += m
    return float(np.sqrt(m2 / count).mean())


def dark_region_std(denoised: str | Path, raw: str | Path | None = None, *,
                    region: tuple[int, int, int, int] | None = None) -> dict[str, Any]:
    """The paper's criterion without ground truth: temporal noise over a dark region.

    Parameters
    ----------
    denoised, raw : str or Path
        Recordings; the region is searched in the raw one's mean image when given.
    region : (y0, y1, x0, x1), optional
        Default: the darkest 16×16 window of the mean image.
    """
    est = Frames(denoised)
    noisy = Frames(raw) if raw is not None else None
    if noisy is not None and noisy.shape != est.shape:
        raise ConfigError(f"{noisy.path} has shape {noisy.shape} but {est.path} has "
                          f"{est.shape}")
    if region is None:
        region = darkest_region(mean_image(noisy or est))
    y0, y1, x0, x1 = region
    if not (0 <= y0 < y1 <= est.shape[1] and 0 <= x0 < x1 <= est.shape[2]):
        raise ConfigError(f"dark region {y0}:{y1},{x0}:{x1} is not inside the "
                          f"{est.shape[1]}×{est.shape[2]} frame")
    out: dict[str, Any] = {"region": list(region), "denoised_std": temporal_std(est, region)}
    if noisy is not None:
        out["raw_std"] = temporal_std(noisy, region)
        # a region the denoiser made constant has no finite reduction to give
        out["reduction"] = (out["raw_std"] / out["denoised_std"] if out["denoised_std"] > 0
                            else None)
    return out


#: Intensity bands of the intensity check: deciles of the raw temporal mean.
BANDS = 10
#: Largest departure of a band's ratio from 1 that the check accepts.
INTENSITY_TOLERANCE = 0.03


def intensity_bands(denoised: str | Path, raw: str | Path, *, bands: int = BANDS,
                    tolerance: float = INTENSITY_TOLERANCE) -> dict[str, Any]:
    """Whether denoising kept intensities: per band of brightness, denoised over raw mean.

    Pixels are grouped by their raw temporal mean into ``bands`` bands of equal pixel counts
    (deciles); in each, the sum of the denoised temporal means over the sum of the raw ones.
    A linear filter keeps 1 in every band; ΔF/F = (F − F₀)/F₀ is wrong by as much as a
    band's ratio is off where F₀ lies in it.

    Parameters
    ----------
    denoised, raw : str or Path
        Recordings of the same shape (stores or source files), read a chunk at a time.
    bands : int
        Number of bands.
    tolerance : float
        Largest accepted ``|ratio - 1|``.

    Returns
    -------
    dict
        ``bands``: per band ``low``, ``high`` (raw mean limits), ``raw_mean``,
        ``denoised_mean`` and ``ratio`` (None where the band's raw mean is not positive);
        ``whole``: the ratio over all pixels; ``kept``: every ratio within ``tolerance``.

    Raises
    ------
    ConfigError
        When the shapes differ.
    """
    est, noisy = Frames(denoised), Frames(raw)
    if noisy.shape != est.shape:
        raise ConfigError(f"{noisy.path} has shape {noisy.shape} but {est.path} has "
                          f"{est.shape}")
    raw_mean, den_mean = mean_image(noisy).ravel(), mean_image(est).ravel()
    order = np.argsort(raw_mean, kind="stable")
    rows = []
    for part in np.array_split(order, bands):
        if not len(part):
            continue
        r, d = float(raw_mean[part].mean()), float(den_mean[part].mean())
        rows.append({"low": float(raw_mean[part[0]]), "high": float(raw_mean[part[-1]]),
                     "raw_mean": r, "denoised_mean": d, "ratio": d / r if r > 0 else None})
    total = float(raw_mean.mean())
    kept = all(row["ratio"] is None or abs(row["ratio"] - 1) <= tolerance for row in rows)
    return {"bands": rows, "whole": float(den_mean.mean()) / total if total > 0 else None,
            "kept": kept, "tolerance": tolerance}


def intensity_line(check: dict[str, Any]) -> str:
    """One line saying what :func:`intensity_bands` found."""
    ratios = " ".join("—" if b["ratio"] is None else f"{b['ratio']:.3f}" for b in check["bands"])
    verdict = ("kept" if check["kept"] else
               f"NOT kept (a band off by more than {check['tolerance']:.0%})")
    return f"intensity, denoised/raw mean by decile of brightness: {ratios} — {verdict}"
