"""Fitting a trained network's intensity calibration on frames of its recordings.

After every epoch the network denoises a small sample of whole frames — the start of each
recording's validation region, which it never trained on, a few crops of it when frames are
large — exactly as ``denoise`` would (full frame rate, mirrored edges), and
:func:`~deepcad_chunked.model.calibration.fit_calibration` finds the correction of its output
that gives every band of brightness of the sample the mean of its raw frames. The checkpoint
carries it; every command that denoises applies it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from deepcad_chunked.infer.predict import predict_array
from deepcad_chunked.model.calibration import Calibration, fit_calibration
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.store.recording import Recording
from deepcad_chunked.training.dataset import Normalization
from deepcad_chunked.training.tiles import Region

log = logging.getLogger(__name__)

#: Frames of each sample whose means are matched.
FRAMES = 64
#: Frames and pixels of context read around a sample (mirrored where the recording ends).
CONTEXT = 16
#: Side of the crops a large frame is sampled by.
CROP = 128
#: Largest number of voxels (without context) sampled in all.
BUDGET = 2**22


def _spread(lo: int, hi: int, size: int, count: int) -> list[int]:
    """``count`` starts of windows of ``size`` evenly spread over ``lo:hi``."""
    if count <= 1 or hi - lo <= size:
        return [lo + max(0, (hi - lo - size) // 2)]
    return [lo + round(i * (hi - lo - size) / (count - 1)) for i in range(count)]


def sample_boxes(regions: Sequence[Region], budget: int = BUDGET
                 ) -> Iterator[tuple[Region, tuple[slice, slice, slice]]]:
    """The boxes ``(t, y, x)`` of the calibration sample: per region, up to :data:`FRAMES`
    frames from its start, the whole frame or crops of it spread over it, within
    ``budget`` voxels in all."""
    share = max(1, budget // max(1, len(regions)))
    for region in regions:
        t0, t1 = region.t
        frames = min(FRAMES, t1 - t0)
        (y0, y1), (x0, x1) = region.y, region.x
        ts = slice(t0, t0 + frames)
        if frames * (y1 - y0) * (x1 - x0) <= share:
            yield region, (ts, slice(y0, y1), slice(x0, x1))
            continue
        per_axis = max(1, math.isqrt(max(1, share // (frames * CROP * CROP))))
        for y in _spread(y0, y1, CROP, per_axis):
            for x in _spread(x0, x1, CROP, per_axis):
                yield region, (ts, slice(y, min(y + CROP, y1)), slice(x, min(x + CROP, x1)))


def calibrate(model: UNet3D, norm: Normalization, recordings: Sequence[Recording],
              regions: Sequence[Region], device: torch.device) -> Calibration:
    """The intensity calibration of ``model`` on samples of ``regions`` of ``recordings``.

    Parameters
    ----------
    model : UNet3D
        The network as trained (left untouched: a copy runs).
    norm : Normalization
        Its input normalisation.
    recordings : sequence of Recording
        What it was trained on.
    regions : sequence of Region
        Where to sample (the validation regions).
    device : torch.device

    Returns
    -------
    Calibration
        In the network's normalised units.
    """
    net = copy.deepcopy(model).eval()
    net.normalization = {"mean": norm.mean, "std": norm.std}
    mean, std = np.float32(norm.mean), np.float32(norm.std)
    outputs, inputs = [], []
    for region, (ts, ys, xs) in sample_boxes(regions):
        array = recordings[region.recording].array
        n, height, width = array.shape[0], array.shape[-2], array.shape[-1]
        lo = [max(0, s.start - CONTEXT) for s in (ts, ys, xs)]
        hi = [min(m, s.stop + CONTEXT) for s, m in zip((ts, ys, xs), (n, height, width),
                                                        strict=True)]
        index = (slice(lo[0], hi[0]), *region.plane, slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        raw = np.asarray(array[index], dtype=np.float32)
        out = predict_array(net, raw, device=device)
        core = tuple(slice(s.start - a, s.stop - a) for s, a in zip((ts, ys, xs), lo,
                                                                    strict=True))
        outputs.append((out[core] - mean) / std)
        inputs.append((raw[core] - mean) / std)
    calibration = fit_calibration(outputs, inputs)
    low, high = calibration.span()
    log.info("intensity calibration: the network's output shifted by %+.3g to %+.3g (raw "
             "units) over %d sampled voxels", low * norm.std, high * norm.std,
             sum(o.size for o in outputs))
    return calibration
