"""Whether denoising helped, said at the end of every ``run`` and ``demo``.

Two checks that need no ground truth: the held-out frame score of the network against the
Gaussian filters and the raw frames (:mod:`deepcad_chunked.heldout`), over at most
:data:`FRAMES` frames the training held out, and the intensity check
(:func:`deepcad_chunked.metrics.intensity_bands`): denoised over raw temporal mean by decile of
brightness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepcad_chunked.errors import ConfigError
from deepcad_chunked.heldout import held_out_range, heldout_score
from deepcad_chunked.metrics import intensity_bands, intensity_line
from deepcad_chunked.store.recording import open_recording

#: Most frames the held-out score of a run reads (it denoises half of them again).
FRAMES = 256


def verdict(recording: str | Path, denoised: str | Path, model: str | Path, *,
            device: str = "auto") -> dict[str, Any]:
    """The held-out score and the intensity check of a finished run.

    Parameters
    ----------
    recording, denoised : str or Path
        The raw recording's store and the denoised one.
    model : str or Path
        The checkpoint that denoised it.
    device : str
        Where the held-out score runs the network.

    Returns
    -------
    dict
        ``held_out`` (:func:`~deepcad_chunked.heldout.heldout_score`, or None when the
        recording is too short to have held frames out), ``intensity``
        (:func:`~deepcad_chunked.metrics.intensity_bands`) and ``lines``: what to tell the user.
    """
    recording = Path(recording).absolute()
    frames = open_recording(recording).shape[0]
    lines = []
    held: dict[str, Any] | None
    try:
        (start, stop), _ = held_out_range(model, str(recording), frames)
        stop = min(stop, start + FRAMES)
        held = heldout_score(recording, model=model, frames=(start, stop), device=device,
                             recording_store=str(recording))
    except ConfigError as exc:
        held = None
        lines.append(f"held-out score: not measured ({exc})")
    if held is not None:
        rows = {row["name"]: row for row in held["rows"]}
        gaussians = [r for r in held["rows"] if r["name"].startswith("gaussian")]
        best_gaussian = min(gaussians, key=lambda r: r["mse"])
        rank = [r["name"] for r in held["rows"]].index("denoised") + 1
        gap = rows["denoised"]["mse"] - best_gaussian["mse"]
        lines.append(
            f"held-out score (frames {start}–{stop}, which training held out; {held['pairs']} "
            f"odd frames): the network ranks {rank} of {len(held['rows'])}; its error is "
            f"{abs(gap):.4g} {'below' if gap <= 0 else 'ABOVE'} the best Gaussian's "
            f"({best_gaussian['name']}) and {rows['raw']['mse'] - rows['denoised']['mse']:.4g} "
            "below the raw frames' (squared sample units)")
    intensity = intensity_bands(denoised, recording)
    lines.append(intensity_line(intensity))
    return {"held_out": held, "intensity": intensity, "lines": lines}
