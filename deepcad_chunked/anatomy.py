"""The anatomy of simulated fields of view: footprints of somata and neurites, vessels, texture.

Everything here is static and drawn from a random generator it is given: the simulator
(:mod:`deepcad_chunked.simulate`) places these shapes once per recording and animates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Footprint:
    """A neuron's spatial weights: ``patch`` placed with its corner at ``(y, x)``."""

    y: int
    x: int
    patch: np.ndarray

    def region(self) -> tuple[slice, slice]:
        """Where the patch lies in the frame."""
        return (slice(self.y, self.y + self.patch.shape[0]),
                slice(self.x, self.x + self.patch.shape[1]))


def _soft_disk(r: np.ndarray, edge: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp((r - edge) / width))


def soma(rng: np.random.Generator, cy: float, cx: float, radius: float,
         shape: tuple[int, int], irregular: float = 0.0) -> Footprint | None:
    """A ring-like soma (cytosolic indicator, dim nucleus) of about ``radius`` px around
    ``(cy, cx)``, clipped to the frame; None when too little of it lies inside.

    ``irregular`` > 0 bends its outline by random 2nd and 3rd angular harmonics of that
    relative amplitude and stretches it more (pyramidal and packed cells are rarely round).
    """
    spread = 1.25 + 0.4 * irregular
    stretch, angle = rng.uniform(1 / spread, spread), rng.uniform(0, math.pi)
    half = math.ceil(radius * 1.4) + 1
    y0, x0 = round(cy) - half, round(cx) - half
    yy, xx = np.mgrid[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1].astype(np.float64)
    u = (yy - cy) * math.cos(angle) + (xx - cx) * math.sin(angle)
    v = -(yy - cy) * math.sin(angle) + (xx - cx) * math.cos(angle)
    rho = np.hypot(u / (radius * math.sqrt(stretch)), v * math.sqrt(stretch) / radius)
    if irregular:
        theta = np.arctan2(v, u)
        a2, a3 = rng.uniform(0, irregular, 2)
        p2, p3 = rng.uniform(0, 2 * math.pi, 2)
        rho = rho / (1 + a2 * np.cos(2 * theta + p2) + a3 * np.cos(3 * theta + p3))
    patch = _soft_disk(rho, 1.0, 0.08) * (1.0 - 0.7 * _soft_disk(rho, 0.55, 0.06))
    top, left = max(0, -y0), max(0, -x0)
    bottom = patch.shape[0] - max(0, y0 + patch.shape[0] - shape[0])
    right = patch.shape[1] - max(0, x0 + patch.shape[1] - shape[1])
    patch = patch[top:bottom, left:right]
    if patch.size == 0 or patch.max() < 0.5:
        return None
    return Footprint(y0 + top, x0 + left, patch.astype(np.float32))


def _meander(rng: np.random.Generator, shape: tuple[int, int], start: tuple[float, float],
             heading: float, steps: int, turn: float) -> np.ndarray:
    """A boolean map of a random smooth path from ``start`` (y, x), in half-pixel steps whose
    heading turns by ``N(0, turn)`` radians each, until it leaves the frame."""
    line = np.zeros(shape, dtype=bool)
    y, x = start
    for _ in range(steps):
        if not (0 <= y < shape[0] and 0 <= x < shape[1]):
            break
        line[int(y), int(x)] = True
        heading += rng.normal(0, turn)
        y, x = y + 0.5 * math.sin(heading), x + 0.5 * math.cos(heading)
    return line


def vessel_transmission(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Transmission (1 clear, ~0.15 inside) of a few meandering dark vessels, ``(y, x)``."""
    out = np.ones(shape)
    count = max(1, round(2 * shape[0] * shape[1] / 256**2))
    for _ in range(count):
        width = rng.uniform(5, 12)
        y, x = rng.uniform(0, shape[0]), 0.0
        heading = rng.uniform(-0.6, 0.6)
        if rng.random() < 0.5:  # from the top instead of the left
            y, x, heading = 0.0, rng.uniform(0, shape[1]), heading + math.pi / 2
        line = _meander(rng, shape, (y, x), heading, 4 * (shape[0] + shape[1]), 0.04)
        distance = ndimage.distance_transform_edt(~line)
        out *= 1.0 - 0.85 * np.exp(-((distance / (width / 2)) ** 4))
    return out


def neurite(rng: np.random.Generator, shape: tuple[int, int]) -> Footprint | None:
    """A thin dendrite or axon: a meandering line 1–3 px wide (Gaussian profile), with
    varicosities (brighter beads) along it; None when it barely enters the frame."""
    length = int(rng.uniform(0.5, 1.5) * (shape[0] + shape[1]))
    start = (rng.uniform(0, shape[0]), rng.uniform(0, shape[1]))
    line = _meander(rng, shape, start, rng.uniform(0, 2 * math.pi), 2 * length, 0.08)
    if line.sum() < 12:
        return None
    ys, xs = np.nonzero(line)
    y0, y1 = max(0, ys.min() - 4), min(shape[0], ys.max() + 5)
    x0, x1 = max(0, xs.min() - 4), min(shape[1], xs.max() + 5)
    local = line[y0:y1, x0:x1]
    distance = ndimage.distance_transform_edt(~local)
    width = rng.uniform(0.5, 1.2)
    beads = ndimage.gaussian_filter((rng.random(local.shape) < 0.02) * local * 1.0, 1.0)
    patch = np.exp(-0.5 * (distance / width) ** 2) * (1 + 3 * beads / max(beads.max(), 1e-9))
    return Footprint(int(y0), int(x0), (patch / patch.max()).astype(np.float32))


def fine_texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float = 1.2
                 ) -> np.ndarray:
    """Neuropil's fine grain: smoothed noise, zero mean, unit standard deviation."""
    grain = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (grain - grain.mean()) / max(float(grain.std()), 1e-12)


def zones(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """``count`` smooth non-negative weight maps ``(count, y, x)`` summing to one: regions of
    neuropil whose brightness fluctuates on its own."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    width = max(shape) / 3
    maps = np.stack([np.exp(-((yy - rng.uniform(0, shape[0])) ** 2
                              + (xx - rng.uniform(0, shape[1])) ** 2) / (2 * width**2))
                     for _ in range(count)])
    return maps / maps.sum(0, keepdims=True)
