"""A visual report of a denoised recording, drawn from a few frames read out of core.

One PNG: a raw and a denoised frame side by side, each with a zoomed inset; temporal
standard-deviation projections of both; and the traces of a few regions of interest (given,
a simulation's brightest neurons, or the brightest spots of the denoised recording). A short
GIF (or MP4, with ffmpeg) of a crop, raw beside denoised, on request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from deepcad_chunked.errors import ConfigError, OutputExistsError
from deepcad_chunked.metrics import Frames
from deepcad_chunked.store.location import no_folder
from deepcad_chunked.store.pins import check_disjoint

log = logging.getLogger(__name__)

#: Frames read for the projections and traces.
WINDOW = 300
#: Radius of a region of interest given as a point, in pixels.
ROI_RADIUS = 3


def _window(n: int, frames: int) -> tuple[int, int]:
    frames = min(frames, n)
    start = (n - frames) // 2
    return start, start + frames


def _rois_from_points(points: Sequence[tuple[int, int]], shape: tuple[int, int]
                      ) -> list[np.ndarray]:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    masks = []
    for y, x in points:
        if not (0 <= y < shape[0] and 0 <= x < shape[1]):
            raise ConfigError(f"ROI {y},{x} is outside the {shape[0]}×{shape[1]} frame")
        masks.append(np.hypot(yy - y, xx - x) <= ROI_RADIUS)
    return masks


def _brightest_spots(image: np.ndarray, count: int) -> list[tuple[int, int]]:
    smooth = ndimage.gaussian_filter(image, 2.0)
    peaks = (smooth == ndimage.maximum_filter(smooth, size=2 * ROI_RADIUS * 3 + 1))
    ys, xs = np.nonzero(peaks)
    order = np.argsort(smooth[ys, xs])[::-1][:count]
    return [(int(ys[i]), int(xs[i])) for i in order]


def _rois(denoised: np.ndarray, rois: Sequence[tuple[int, int]] | None,
          footprints: str | Path | None, count: int) -> list[np.ndarray]:
    shape = denoised.shape[1:]
    if rois:
        return _rois_from_points(rois, shape)
    if footprints is not None:
        from deepcad_chunked.simulate import load_truth

        masks = []
        for fp in load_truth(footprints).footprints:
            mask = np.zeros(shape, dtype=bool)
            mask[fp.region()] = fp.patch > 0.5
            masks.append(mask)
        masks.sort(key=lambda m: -float(denoised[:, m].std(axis=0).mean()) if m.any() else 0)
        return masks[:count]
    return _rois_from_points(_brightest_spots(denoised.std(axis=0), count), shape)


def _draw_frames(fig: Any, grid: Any, x: np.ndarray, y: np.ndarray, start: int,
                 limits: tuple[float, float], masks: list[np.ndarray]) -> None:
    """The middle frame of each recording with a magnified inset, and their temporal
    standard deviations with the regions numbered."""
    import matplotlib.pyplot as plt

    stop, mid, (low, high) = start + len(x), len(x) // 2, limits
    shape = x.shape
    spot = _brightest_spots(y.std(axis=0), 1)[0] if y.shape[1] > 8 else (0, 0)
    half = max(8, min(shape[1:]) // 8)
    zoom = (max(0, spot[0] - half), max(0, spot[1] - half))
    for col, (name, data) in enumerate((("raw", x), ("denoised", y))):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(data[mid], cmap="gray", vmin=low, vmax=high)
        ax.set_title(f"{name}, frame {start + mid}")
        ax.axis("off")
        # the inset sits in the quadrant away from the region it magnifies
        top = spot[0] > shape[1] / 2
        left = spot[1] > shape[2] / 2
        inset = ax.inset_axes([0.02 if left else 0.62, 0.62 if top else 0.02, 0.36, 0.36])
        inset.imshow(data[mid, zoom[0]:zoom[0] + 2 * half, zoom[1]:zoom[1] + 2 * half],
                     cmap="gray", vmin=low, vmax=high)
        inset.set_xticks([])
        inset.set_yticks([])
        for side in inset.spines.values():
            side.set_color("yellow")
        ax.add_patch(plt.Rectangle((zoom[1], zoom[0]), 2 * half, 2 * half, fill=False,
                                   color="yellow", lw=1))
        ax = fig.add_subplot(grid[1, col])
        ax.imshow(data.std(axis=0), cmap="magma")
        ax.set_title(f"{name}: temporal standard deviation, frames {start}–{stop - 1}")
        ax.axis("off")
        if col == 1:
            for k, mask in enumerate(masks):
                cy, cx = ndimage.center_of_mass(mask)
                ax.annotate(str(k + 1), (cx, cy), color="cyan", fontsize=9, ha="center")


def _draw_traces(ax: Any, x: np.ndarray, y: np.ndarray, start: int,
                 masks: list[np.ndarray]) -> None:
    """Raw and denoised traces of the regions, each scaled to its denoised range."""
    stop = start + len(x)
    t = np.arange(start, stop)
    spread = 0.0
    for k, mask in enumerate(masks):
        raw_trace, den_trace = x[:, mask].mean(axis=1), y[:, mask].mean(axis=1)
        scale = float(np.ptp(den_trace)) or 1.0
        ax.plot(t, (raw_trace - den_trace.min()) / scale + spread, color="0.7", lw=0.7,
                label="raw" if k == 0 else None)
        ax.plot(t, (den_trace - den_trace.min()) / scale + spread, lw=1.2,
                label="denoised" if k == 0 else None)
        ax.text(t[0], spread + 0.5, f"{k + 1} ", ha="right", va="center")
        spread += 1.6
    ax.set_xlabel("frame")
    ax.set_yticks([])
    ax.set_title("regions of interest (each scaled to its denoised range)")
    if masks:
        ax.legend(loc="upper right")


def preview(raw: str | Path, denoised: str | Path, output: str | Path, *,
            frames: int = WINDOW, rois: Sequence[tuple[int, int]] | None = None,
            footprints: str | Path | None = None, traces: int = 4,
            movie: str | Path | None = None, crop: tuple[int, int, int, int] | None = None,
            overwrite: bool = True) -> Path:
    """Draw the report of a denoised recording.

    Parameters
    ----------
    raw, denoised : str or Path
        Recordings (OME-Zarr stores or TIFF files) of the same shape.
    output : str or Path
        The PNG to write.
    frames : int
        Frames read (the middle of the recording) for projections, traces and the movie.
    rois : sequence of (y, x), optional
        Centres of regions of interest (disks of radius 3).
    footprints : str or Path, optional
        A simulation's ``_truth.npz``: its most active neurons are the regions.
    traces : int
        Regions drawn when none are given.
    movie : str or Path, optional
        Also write a GIF (``.gif``) or MP4 (``.mp4``, needs ffmpeg) of a crop.
    crop : (y0, y1, x0, x1), optional
        The movie's crop; default: 96×96 pixels around the centre.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    Path
        The PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output).expanduser().absolute()
    for path in (output, Path(movie) if movie else None):
        if path is not None:
            check_disjoint(path, [raw, denoised, *([footprints] if footprints else [])])
        if path is not None and path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        if path is not None and not path.parent.is_dir():
            raise ConfigError(f"cannot write {path}: {no_folder(path.parent)}")
    a, d = Frames(raw), Frames(denoised)
    if a.shape != d.shape:
        raise ConfigError(f"{a.path} has shape {a.shape} but {d.path} has {d.shape}")
    start, stop = _window(a.shape[0], frames)
    x, y = a.read(start, stop), d.read(start, stop)
    masks = _rois(y, rois, footprints, traces)
    mid = (stop - start) // 2
    low, high = np.percentile(x[mid], [1, 99.7])
    fig = plt.figure(figsize=(12, 13), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.8])
    _draw_frames(fig, grid, x, y, start, (low, high), masks)
    _draw_traces(fig.add_subplot(grid[2, :]), x, y, start, masks)
    fig.savefig(output, dpi=80)
    plt.close(fig)
    if movie is not None:
        _movie(x, y, Path(movie), crop, low, high)
    return output


def _movie(x: np.ndarray, y: np.ndarray, path: Path, crop: tuple[int, int, int, int] | None,
           low: float, high: float) -> None:
    import matplotlib.pyplot as plt
    from matplotlib import animation

    if crop is None:
        cy, cx, h = x.shape[1] // 2, x.shape[2] // 2, 48
        crop = (max(0, cy - h), cy + h, max(0, cx - h), cx + h)
    y0, y1, x0, x1 = crop
    if not (0 <= y0 < y1 <= x.shape[1] and 0 <= x0 < x1 <= x.shape[2]):
        raise ConfigError(f"crop {y0}:{y1},{x0}:{x1} is not inside the frame")
    if path.suffix.lower() == ".gif":
        writer: animation.AbstractMovieWriter = animation.PillowWriter(fps=15)
    elif path.suffix.lower() == ".mp4":
        if not animation.FFMpegWriter.isAvailable():
            raise ConfigError("an .mp4 movie needs ffmpeg on the PATH; ask for a .gif instead")
        writer = animation.FFMpegWriter(fps=15)
    else:
        raise ConfigError(f"movie {path.name}: give a .gif or .mp4 file name")
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2), layout="constrained")
    images = []
    for ax, data, name in zip(axes, (x, y), ("raw", "denoised"), strict=True):
        images.append(ax.imshow(data[0, y0:y1, x0:x1], cmap="gray", vmin=low, vmax=high))
        ax.set_title(name)
        ax.axis("off")
    with writer.saving(fig, str(path), dpi=50):
        for t in range(min(len(x), 100)):
            for image, data in zip(images, (x, y), strict=True):
                image.set_data(data[t, y0:y1, x0:x1])
            writer.grab_frame()
    plt.close(fig)


def write_live_preview(path: str | Path, raw: np.ndarray, denoised: np.ndarray, *,
                       frame: int) -> Path:
    """Replace ``path`` (a PNG) with one frame, raw on the left and denoised on the right.

    Both halves share the raw frame's contrast (its 1st to 99.7th percentile), so what the
    denoising removed is seen as it is. The picture is written beside ``path`` and renamed
    over it: a viewer never sees half of one.

    Parameters
    ----------
    path : str or Path
        The PNG to keep up to date.
    raw, denoised : numpy.ndarray
        One frame ``(y, x)`` of each.
    frame : int
        Its index, written into the PNG's metadata.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib.image

    path = Path(path).expanduser()
    low, high = np.percentile(raw, [1, 99.7])
    scale = max(float(high - low), 1e-12)
    gap = np.ones((raw.shape[0], max(2, raw.shape[1] // 64)))
    picture = np.concatenate([(raw - low) / scale, gap, (denoised - low) / scale], axis=1)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    matplotlib.image.imsave(partial, np.clip(picture, 0, 1), cmap="gray", vmin=0, vmax=1,
                            format="png", metadata={"Description": f"frame {frame}"})
    os.replace(partial, path)
    return path
