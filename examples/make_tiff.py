"""Write a small synthetic calcium-imaging recording as a uint16 TIFF to try the tools on.

Usage: python examples/make_tiff.py OUT.tif [--frames 300] [--size 128] [--seed 0]

Bright, blinking round cells on a dim background, with Poisson (shot) noise. For realistic
simulations with ground truth, see ``deepcad-chunked simulate`` (when available).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile


def synthetic_recording(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """A noisy movie of blinking cells.

    Parameters
    ----------
    frames, size : int
        Number of frames and their edge length in pixels.
    seed : int
        Random seed.

    Returns
    -------
    numpy.ndarray
        ``(frames, size, size)`` uint16.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cells = size * size // 400 + 1
    clean = np.full((frames, size, size), 20.0)
    for _ in range(cells):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(3, 7)
        footprint = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        spikes = rng.random(frames) < 0.02
        trace = np.convolve(spikes.astype(float), np.exp(-np.arange(60) / 15.0))[:frames]
        clean += (10 + 60 * trace)[:, None, None] * footprint[None] * rng.uniform(0.5, 1.5)
    return rng.poisson(clean).astype(np.uint16)


def main() -> None:
    """Parse the command line and write the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = synthetic_recording(args.frames, args.size, args.seed)
    tifffile.imwrite(args.output, data, photometric="minisblack",
                     metadata={"axes": "TYX"})


if __name__ == "__main__":
    main()
