"""The per-piece kernels of a denoising job, shared by ``denoise`` (a dask graph over the whole
recording) and ``follow`` (tasks of a few frames while the recording grows).

A span of frames is denoised from its frames and a halo around them, mirrored at the
recording's edges (:func:`~deepcad_chunked.infer.predict.span_indices`),
normalised with the model's mean and standard deviation, passed through the network
(:func:`~deepcad_chunked.infer.predict.denoise_block`), cropped to the span and returned to raw
units; what is stored is checked to be finite and cast to the output's sample type
(:func:`stored_samples`). The two jobs compute every step with these same functions, so a frame
denoised by ``follow`` equals the same frame denoised by ``denoise``.
"""

from __future__ import annotations

import numpy as np

from deepcad_chunked.errors import ModelOutputError
from deepcad_chunked.infer.predict import denoise_block, denormalise, mirror_indices, normalise


def denoise_frames(raw: np.ndarray, frames: int, *, halo: int, mean: float, std: float,
                   model_path: str, digest: str, device: str, precision: str,
                   max_voxels: int | None) -> np.ndarray:
    """Denoise ``frames`` frames from ``raw``, their
    :func:`~deepcad_chunked.infer.predict.span_indices` input (the halo in
    time already there); float32 in raw units.

    Parameters
    ----------
    raw : ndarray
        ``(len(span_indices(…)), height, width)`` raw samples.
    frames : int
        Frames of the span (the first ``frames`` after the leading halo are returned).
    halo : int
    mean, std : float
        The model's normalisation (resolved for this recording).
    model_path, digest, device, precision, max_voxels
        As :func:`~deepcad_chunked.infer.predict.denoise_block`.

    Returns
    -------
    ndarray
        ``(frames, height, width)`` float32.
    """
    mean32, std32 = np.float32(mean), np.float32(std)
    ys = mirror_indices(raw.shape[1], halo)
    xs = mirror_indices(raw.shape[2], halo)
    x = normalise(raw[:, ys][:, :, xs], mean32, std32)
    out = denoise_block(x, model_path=model_path, digest=digest, device=device,
                        precision=precision, halo=halo, max_voxels=max_voxels)
    height, width = raw.shape[1:]
    core = out[halo:halo + frames, halo:halo + height, halo:halo + width]
    return denormalise(core, mean32, std32)


def require_finite(values: np.ndarray, precision: str) -> None:
    """Refuse results that are NaN or infinite: they must never be stored as a result.

    Raises
    ------
    ModelOutputError
        Saying how many there are and what may help.
    """
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        hint = ("--precision fp32 may avoid the overflow" if precision != "fp32" else
                "the model is unusable for this recording (a diverged training run?): use an "
                "earlier checkpoint, or train again with a lower --lr")
        raise ModelOutputError(f"the network produced {bad} NaN or infinite values in a "
                               f"block of {values.shape} voxels; nothing was stored for it, "
                               f"and the output stays incomplete: {hint}")


def cast_samples(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Denoised values (float32, raw units) as samples of ``dtype``: integers rounded and
    clipped to the type's range."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return x.round().clip(info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def stored_samples(values: np.ndarray, dtype: str | np.dtype, precision: str) -> np.ndarray:
    """Denoised values (float32, raw units) checked (:func:`require_finite`) and cast
    (:func:`cast_samples`), ready to be written.

    Raises
    ------
    ModelOutputError
        For NaN or infinite values.
    """
    require_finite(values, precision)
    return cast_samples(values, np.dtype(dtype))
