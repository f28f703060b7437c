"""How well a denoiser did on a recording without ground truth: the held-out frame score.

The even frames of a stretch of the recording are denoised on their own, by every method (the
trained network, a few 3D Gaussian filters, nothing at all), and each method's estimate of
every odd frame — the mean of its estimates of the even frames on either side — is compared
with that odd frame, which none of them saw. The odd frame's noise is independent of the even
frames, so for every method

    E[(estimate − odd)²] = E[(estimate − truth)²] + noise variance,

and the noise term is the same for all methods: differences between the held-out errors
estimate differences between the true errors, and their order is the order of the true errors.

The network must not have been trained on the odd frames either (DeepCAD trains on pairs of
consecutive frames, so a model sees every frame of its training data as a target). By default
the score is taken over the frames the model's training held out for validation when the
recording is the one it was trained on, and over the whole recording when it was trained on
another one. The network sees the even frames at half the frame rate: the rate it is trained
at (its input tiles are every other frame). Gaussian filters are applied with their temporal
width halved (in even-frame steps), i.e. the same width in seconds.

Everything is read a piece of frames at a time; recordings larger than memory are fine.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from deepcad_chunked.errors import ConfigError
from deepcad_chunked.metrics import GAUSSIANS, Frames

log = logging.getLogger(__name__)

#: Even frames denoised per piece (each with its temporal context).
PIECE = 64


@dataclass(frozen=True)
class HeldOutRow:
    """One method's held-out error.

    Attributes
    ----------
    name : str
        ``raw``, ``gaussian σt=… σyx=…`` (σt in frames of the full recording) or ``denoised``.
    mse : float
        Mean squared difference between its estimate of the odd frames and the odd frames.
    excess : float
        ``mse`` minus the lowest ``mse`` of all methods: an estimate of how much larger its true
        mean squared error is than the best method's (in squared sample units).
    gap_db : float
        ``mse`` over the best method's, in dB: 0 for the best; for another, a lower bound (in
        expectation) on how much larger its true error is, which the shared noise variance
        in both ``mse`` partly hides.
    """

    name: str
    mse: float
    excess: float
    gap_db: float


@dataclass(frozen=True)
class _Method:
    name: str
    sigma: tuple[float, float] | None  # Gaussian (σt in even frames, σyx); None: network/raw
    network: bool = False


def held_out_range(model_path: str | Path | None, recording_store: str | None,
                   frames: int) -> tuple[tuple[int, int], str]:
    """The frames to score: the model's validation frames of its own recording, else all.

    Parameters
    ----------
    model_path : path, optional
        The checkpoint; its training data and validation fraction are read from it.
    recording_store : str, optional
        Absolute path of the store the denoised recording was made from (its provenance).
    frames : int
        Frames of the recording.

    Returns
    -------
    ((start, stop), why)
        The range and a sentence saying why it was chosen.
    """
    if model_path is None:
        return (0, frames), "all frames (no network scored)"
    from deepcad_chunked.model.checkpoint import Checkpoint
    from deepcad_chunked.training.tiles import split_regions

    config = Checkpoint.load(model_path).config
    data = [str(p) for p in config.get("data") or []]
    if not data:
        return (0, frames), ("all frames (the model does not say what it was trained on; "
                             "frames it trained on would favour it)")
    if recording_store is None or recording_store not in data:
        return (0, frames), "all frames (the model was trained on other recordings)"
    index = data.index(recording_store)
    patch = config.get("patch") or (16, 64, 64)
    tile = (2 * int(patch[0]), int(patch[1]), int(patch[2]))
    shapes = [(frames, 10**9, 10**9)] * len(data)  # only the time split matters here
    _, val = split_regions(shapes, tile, float(config.get("val_fraction", 0.05)))
    held = [r for r in val if r.recording == index]
    if not held or held[0].t == (0, frames):
        raise ConfigError("the model was trained on every frame of this recording (it was too "
                          "short to hold frames out); give --frames of a stretch it did not "
                          "train on, or score a model trained on another recording")
    start, stop = held[0].t
    return (start, stop), (f"frames {start}–{stop}, which the model's training held out for "
                           "validation")


@dataclass
class _Network:
    """The network, loaded once, and how it runs."""

    model: Any
    device: str
    precision: str
    halo: int
    max_voxels: int

    @classmethod
    def load(cls, path: str | Path, device: str, precision: str) -> _Network:
        from deepcad_chunked.infer.memory import bytes_per_voxel, worker_memory
        from deepcad_chunked.infer.predict import default_halo, resolve_device
        from deepcad_chunked.model.checkpoint import load_model

        dev = resolve_device(device)
        network = load_model(path, dev)
        max_voxels = (worker_memory(dev)["bytes"]
                      // bytes_per_voxel(network.features, precision, dev))
        return cls(network, dev, precision, default_halo(), max_voxels)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        from deepcad_chunked.infer.predict import predict_array

        return predict_array(self.model, frames.astype(np.float32), device=self.device,
                             precision=self.precision, max_voxels=self.max_voxels)


def _squared_errors(source: Frames, clean: Frames | None, methods: list[_Method],
                    network: _Network | None, start: int, pairs: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each method's summed squared error at the odd frames (and, with ``clean``, its true
    one), a piece of frames at a time: the estimate from the even frames around them."""
    evens = pairs + 1
    margin = max([network.halo if network else 0] + [int(4.0 * m.sigma[0] + 0.5)
                                                     for m in methods if m.sigma])
    margin = -(-margin // 8) * 8  # pieces start on the network's 8-frame grid
    sse = np.zeros(len(methods))
    true_sse = np.zeros(len(methods))
    for k0 in range(0, pairs, PIECE):
        k1 = min(pairs, k0 + PIECE)  # score odd frames k0..k1-1: needs even frames k0..k1
        lo, hi = max(0, k0 - margin), min(evens, k1 + 1 + margin)
        even = source.read(start + 2 * lo, start + 2 * hi - 1)[::2]
        odd = source.read(start + 2 * k0 + 1, start + 2 * k1 + 1)[::2]
        keep = slice(k0 - lo, k1 + 1 - lo)
        truth_odd = (clean.read(start + 2 * k0 + 1, start + 2 * k1 + 1)[::2]
                     if clean is not None else None)
        for i, method in enumerate(methods):
            if method.network:
                assert network is not None
                est = network(even)[keep]
            elif method.sigma is not None:
                st, syx = method.sigma
                est = ndimage.gaussian_filter(even, sigma=(st, syx, syx), mode="reflect")[keep]
            else:
                est = even[keep]
            guess = 0.5 * (est[:-1].astype(np.float64) + est[1:])
            sse[i] += float(((guess - odd) ** 2).sum())
            if truth_odd is not None:
                true_sse[i] += float(((guess - truth_odd) ** 2).sum())
    return sse, true_sse


def heldout_score(raw: str | Path, *, model: str | Path | None = None,
                  frames: tuple[int, int] | None = None,
                  sigmas: Sequence[tuple[float, float]] = GAUSSIANS, device: str = "auto",
                  precision: str = "fp32", recording_store: str | None = None,
                  truth: str | Path | None = None) -> dict[str, Any]:
    """Score the network and Gaussian filters on odd frames they never saw.

    Parameters
    ----------
    raw : str or Path
        The noisy recording (an OME-Zarr store or any source file).
    model : str or Path, optional
        The network's checkpoint; without it only the Gaussians and the raw frames are scored.
    frames : (start, stop), optional
        Frames to score; default :func:`held_out_range`.
    sigmas : sequence of (σt, σyx)
        Gaussian filters, σt in frames of the full recording.
    device, precision
        Where and how the network runs (``auto``: a GPU when there is one).
    recording_store : str, optional
        The store the network's output was made from (to find its held-out frames).
    truth : str or Path, optional
        A simulation's noise-free recording: each method's true error at the odd frames is
        reported beside its held-out one (to check the score; never needed otherwise).

    Returns
    -------
    dict
        ``frames`` (start, stop), ``why`` (how they were chosen), ``pairs`` (odd frames
        scored), ``rows`` (:class:`HeldOutRow` as dicts, best first), ``best``, and with
        ``truth`` a ``true_mse`` per row.
    """
    source = Frames(raw)
    total = source.shape[0]
    why = "the frames asked for"
    if frames is None:
        frames, why = held_out_range(model, recording_store, total)
    start, stop = frames
    if not (0 <= start < stop <= total) or stop - start < 4:
        raise ConfigError(f"--frames {start}:{stop} must be at least 4 frames within the "
                          f"recording's {total}")
    clean = Frames(truth) if truth is not None else None
    if clean is not None and clean.shape != source.shape:
        raise ConfigError(f"{clean.path} has shape {clean.shape} but {source.path} has "
                          f"{source.shape}")
    methods = [_Method("raw", None)] + [
        _Method(f"gaussian σt={s[0]:g} σyx={s[1]:g}", (s[0] / 2, s[1])) for s in sigmas]
    network = _Network.load(model, device, precision) if model is not None else None
    if network is not None:
        methods.append(_Method("denoised", None, network=True))
    evens = (stop - start + 1) // 2  # even frames start, start+2, … below stop
    odds = (stop - start) // 2
    pairs = min(odds, evens - 1)  # odd frame k lies between even frames k and k+1
    if pairs < 1:
        raise ConfigError(f"frames {start}:{stop} hold no odd frame between two even ones")
    sse, true_sse = _squared_errors(source, clean, methods, network, start, pairs)
    voxels = pairs * math.prod(source.shape[1:])
    mse = sse / voxels
    best = float(mse.min())
    if best <= 0:
        raise ConfigError(f"{source.path} does not change from frame to frame over the frames "
                          "scored: the held-out score measures noise, and there is none")
    rows = [HeldOutRow(m.name, float(e), float(e - best), 10 * math.log10(e / best))
            for m, e in zip(methods, mse, strict=True)]
    order = np.argsort(mse)
    out: dict[str, Any] = {"raw": str(source.path), "model": str(model) if model else None,
                           "frames": [start, stop], "why": why, "pairs": pairs,
                           "rows": [asdict(rows[i]) for i in order],
                           "best": rows[int(order[0])].name}
    if clean is not None:
        for i, row in zip(order, out["rows"], strict=True):
            row["true_mse"] = float(true_sse[i] / voxels)
    return out


def network_of(denoised: str | Path, model: str | Path | None = None
               ) -> tuple[str | None, str | None]:
    """The checkpoint that made a denoised store, and the store it was made from.

    Parameters
    ----------
    denoised : str or Path
        A denoised store of ours (its attributes name the model and its digest), or any
        recording (then only ``model`` can say).
    model : str or Path, optional
        The checkpoint to use instead of the one the store names.

    Returns
    -------
    (model, recording_store)
        Either may be None: no network to score, or unknown provenance.

    Raises
    ------
    ConfigError
        When the store's model file is gone or was replaced since (its digest differs).
    """
    from deepcad_chunked.errors import StoreError
    from deepcad_chunked.model.checkpoint import Checkpoint
    from deepcad_chunked.sources.remote import is_http
    from deepcad_chunked.store.attributes import StoreAttributes
    from deepcad_chunked.store.location import resolve
    from deepcad_chunked.store.recording import open_recording

    stored = StoreAttributes()
    if not is_http(str(denoised)):
        with contextlib.suppress(StoreError):  # a source file, or not ours: only --model can say
            stored = open_recording(denoised).stored
    source = stored.provenance.input
    if model is not None:
        return str(model), source
    named = stored.model or {}
    if not named.get("path"):
        return None, source
    location = resolve(named["path"])
    if not location.exists():
        raise ConfigError(f"{denoised} was made with the model {named['path']}, which is gone; "
                          "give it with --model")
    if named.get("digest") and Checkpoint.load(location).digest != named["digest"]:
        raise ConfigError(f"{named['path']} is no longer the model that made {denoised} (its "
                          "weights changed); give the right one with --model")
    return str(named["path"]), source
