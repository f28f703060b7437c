"""The tasks of ``follow``: denoise frames ``start:stop`` of the recording being acquired, on
a worker, from the frames that exist so far (mirrored exactly as ``denoise`` mirrors the
finished recording), and write them and their markers into ``denoised.zarr``.

Each span is three tasks — read, the network's pass, write — so that only the pass holds
the worker's GPU (or its forward slot) and the next span is read while one runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import zarr

from deepcad_chunked.errors import SourceError
from deepcad_chunked.infer.kernels import denoise_frames, stored_samples
from deepcad_chunked.infer.predict import span_indices
from deepcad_chunked.store.integrity import open_array
from deepcad_chunked.store.location import resolve, write_atomic
from deepcad_chunked.store.omezarr import ARRAY_PATH


@dataclass(frozen=True)
class FollowTask:
    """One task: denoise frames ``start:stop`` of the recording, write them and their markers."""

    recording: str
    denoised: str
    markers: str
    start: int
    stop: int
    known: int  # frames of the recording the mirroring is computed for
    unit: int
    halo: int
    model: str
    digest: str
    mean: float
    std: float
    device: str
    precision: str
    dtype: str
    max_voxels: int
    preview: bool


def read_span(task: FollowTask) -> np.ndarray:
    """Read the frames one task's network pass takes (its frames, their halo mirrored at the
    ends of what exists so far). Holds no GPU or forward slot: it runs beside other passes."""
    source = open_array(f"{task.recording}/{ARRAY_PATH}", strict=False)
    t = span_indices(task.known, task.start, task.stop, task.halo)
    lo, hi = int(t.min()), int(t.max()) + 1
    raw = np.asarray(source[lo:hi])[t - lo]
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        frames = sorted({int(f) for f in t[~np.isfinite(raw).all(axis=(1, 2))]})
        raise SourceError(f"frame {frames[0]} of the acquisition holds NaN or infinite "
                          f"samples ({len(frames)} such frame(s) around it); the network needs "
                          "finite values: replace them where the files are written (e.g. with "
                          "numpy.nan_to_num) and follow again")
    return raw


def forward_span(task: FollowTask, raw: np.ndarray) -> np.ndarray:
    """The network's pass over what :func:`read_span` read: the task's denoised frames
    (float32, raw units). The only part that holds the worker's GPU or forward slot."""
    return denoise_frames(raw, task.stop - task.start, halo=task.halo, mean=task.mean,
                          std=task.std, model_path=task.model, digest=task.digest,
                          device=task.device, precision=task.precision,
                          max_voxels=task.max_voxels)


def write_span(task: FollowTask, core: np.ndarray
               ) -> tuple[int, int, float, tuple[np.ndarray, np.ndarray] | None]:
    """Check and write one task's denoised frames, then leave their markers.

    Returns ``(start, stop, time stored, (raw, denoised) of its last frame or None)``.
    """
    target = zarr.open_array(f"{task.denoised}/{ARRAY_PATH}", mode="r+")
    target = target.with_config({"write_empty_chunks": True})
    target[task.start:task.stop] = stored_samples(core, task.dtype, task.precision)
    for unit in range(task.start // task.unit, math.ceil(task.stop / task.unit)):
        write_atomic(resolve(f"{task.markers}/{unit:08d}.done"), b"")
    if not task.preview:
        return task.start, task.stop, time.time(), None
    source = open_array(f"{task.recording}/{ARRAY_PATH}", strict=False)
    return task.start, task.stop, time.time(), (np.asarray(source[task.stop - 1]), core[-1])
