"""Where training tiles come from: hold-out split, stateless sampling and augmentation.

Sample ``i`` of a run is a pure function of ``(seed, i)``: it does not depend on how many
loader workers there are or on what came before, so resuming at step ``s`` replays exactly the
tiles an uninterrupted run would have drawn.

Reading a random tile from a chunked store decompresses every chunk it touches — about twelve
times the tile's own bytes. So consecutive samples share a *window*: a chunk-aligned box of
tile + one chunk per axis, drawn uniformly like a tile; the samples of one window are drawn
uniformly inside it. A loader worker decompresses a window once and cuts many tiles from it
(benchmarks/RESULTS.md, "Training loader"); ``tiles_per_window=1`` gives independent tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product

import numpy as np

log = logging.getLogger(__name__)

#: y–x transforms: rotation by k·90° (k = n % 4), then a left–right flip when n >= 4.
TRANSFORMS = 8


@dataclass(frozen=True)
class Region:
    """A box of one plane of one recording from which whole tiles may be cut.

    Attributes
    ----------
    recording : int
        Index of the recording.
    plane : tuple of int
        Index along the extra axes (``c``, ``z``); empty for ``t, y, x`` recordings.
    t, y, x : (start, stop)
        Extent of the box.
    """

    recording: int
    plane: tuple[int, ...]
    t: tuple[int, int]
    y: tuple[int, int]
    x: tuple[int, int]

    def positions(self, tile: tuple[int, int, int]) -> int:
        """How many tile positions lie fully inside the box."""
        n = 1
        for (lo, hi), w in zip((self.t, self.y, self.x), tile, strict=True):
            n *= max(0, hi - lo - w + 1)
        return n


@dataclass(frozen=True)
class Window:
    """A box of one region from which the tiles of consecutive samples are cut."""

    recording: int
    plane: tuple[int, ...]
    start: tuple[int, int, int]
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class TileDraw:
    """One sample: where to cut the tile and how to turn it into a pair."""

    recording: int
    plane: tuple[int, ...]
    t0: int
    y0: int
    x0: int
    swap: bool
    transform: int


def split_regions(shapes: list[tuple[int, ...]], tile: tuple[int, int, int],
                  val_fraction: float) -> tuple[list[Region], list[Region]]:
    """Training and validation regions, held out in time where the recording allows.

    Parameters
    ----------
    shapes : list of tuple
        Each recording's shape ``(t, [extra...], y, x)``.
    tile : (frames, rows, columns)
        Size of one tile.
    val_fraction : float
        Fraction of the frames at the end of each recording to hold out (at least one tile).

    Returns
    -------
    (train, validation) : lists of Region
        Validation falls back to the right-most columns (or bottom rows) of a recording too
        short to spare frames, and to its training region when it is too small for that too;
        each fallback is logged as a warning.
    """
    tt, ty, tx = tile
    train: list[Region] = []
    val: list[Region] = []
    for r, shape in enumerate(shapes):
        frames, height, width = shape[0], shape[-2], shape[-1]
        planes = list(product(*(range(n) for n in shape[1:-2])))
        held = max(tt, round(frames * val_fraction))
        if frames - held >= tt:
            cut = frames - held
            t_train, t_val = (0, cut), (cut, frames)
            boxes = [((0, height), (0, width), t_train), ((0, height), (0, width), t_val)]
        elif width >= 2 * tx:
            cut = width - tx
            log.warning("recording %d has %d frames: too few to hold out %d for validation; "
                        "holding out its right-most %d columns instead", r, frames, tt, tx)
            boxes = [((0, height), (0, cut), (0, frames)),
                     ((0, height), (cut, width), (0, frames))]
        elif height >= 2 * ty:
            cut = height - ty
            log.warning("recording %d is too small to hold out frames or columns for "
                        "validation; holding out its bottom %d rows instead", r, ty)
            boxes = [((0, cut), (0, width), (0, frames)),
                     ((cut, height), (0, width), (0, frames))]
        else:
            log.warning("recording %d is too small for a separate validation region; "
                        "validation losses are measured on training data", r)
            boxes = [((0, height), (0, width), (0, frames))] * 2
        (ty_tr, tx_tr, tt_tr), (ty_va, tx_va, tt_va) = boxes
        for plane in planes:
            train.append(Region(r, plane, tt_tr, ty_tr, tx_tr))
            val.append(Region(r, plane, tt_va, ty_va, tx_va))
    return train, val


def _pick_region(rng: np.random.Generator, regions: list[Region],
                 tile: tuple[int, int, int]) -> Region:
    weights = np.array([reg.positions(tile) for reg in regions], dtype=np.float64)
    return regions[int(rng.choice(len(regions), p=weights / weights.sum()))]


def draw_window(seed: int, index: int, regions: list[Region], tile: tuple[int, int, int],
                chunks: list[tuple[int, int, int]]) -> Window:
    """Window ``index`` of a run: tile + one chunk per axis, aligned to the chunk grid.

    Parameters
    ----------
    seed : int
        The run's seed.
    index : int
        The window's number (sample number // tiles per window).
    regions : list of Region
        Where tiles may come from; chosen in proportion to their tile positions.
    tile : (frames, rows, columns)
        Size of one tile.
    chunks : list of (t, y, x)
        Each recording's storage chunk shape; windows start on chunk boundaries (or at a
        region's edge).

    Returns
    -------
    Window
    """
    rng = np.random.default_rng([seed, index, 1])
    reg = _pick_region(rng, regions, tile)
    start, shape = [], []
    for (lo, hi), w, c in zip((reg.t, reg.y, reg.x), tile, chunks[reg.recording], strict=True):
        span = min(hi - lo, w + c)
        aligned = range(-(-lo // c) * c, hi - span + 1, c)
        candidates = sorted({lo, hi - span, *aligned})
        start.append(int(candidates[int(rng.integers(len(candidates)))]))
        shape.append(span)
    return Window(reg.recording, reg.plane, tuple(start), tuple(shape))  # type: ignore[arg-type]


def draw(seed: int, index: int, regions: list[Region], tile: tuple[int, int, int],
         augment: bool = True, window: Window | None = None) -> TileDraw:
    """Sample ``index`` of a run: uniform over every tile position (of ``window`` if given).

    Parameters
    ----------
    seed : int
        The run's seed.
    index : int
        The sample's global number (step × batch size + position in the batch).
    regions : list of Region
        Where tiles may come from; a region is chosen with probability proportional to its
        number of tile positions (so longer recordings are drawn more often).
    tile : (frames, rows, columns)
        Size of one tile.
    augment : bool
        Draw the input/target swap and the y–x transform (training); off for validation.
        Tiles that are not square in y–x get only half turns and flips.
    window : Window, optional
        Cut the tile from this window (see :func:`draw_window`).

    Returns
    -------
    TileDraw
    """
    rng = np.random.default_rng([seed, index])
    if window is None:
        reg = _pick_region(rng, regions, tile)
        recording, plane = reg.recording, reg.plane
        bounds = (reg.t, reg.y, reg.x)
    else:
        recording, plane = window.recording, window.plane
        bounds = tuple((a, a + n) for a, n in zip(window.start, window.shape, strict=True))
    starts = [int(rng.integers(lo, hi - w + 1)) for (lo, hi), w in
              zip(bounds, tile, strict=True)]
    swap = bool(rng.integers(2)) if augment else False
    # Quarter turns swap y and x: only for square tiles, else half turns and flips only.
    choices = TRANSFORMS if tile[1] == tile[2] else (0, 2, 4, 6)
    transform = int(rng.choice(choices)) if augment else 0
    return TileDraw(recording, plane, *starts, swap=swap, transform=transform)


def make_pair(tile: np.ndarray, swap: bool, transform: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a ``(2·pt, py, px)`` tile into (input, target): even and odd frames.

    Parameters
    ----------
    tile : numpy.ndarray
        Consecutive frames.
    swap : bool
        Use the odd frames as input and the even ones as target instead.
    transform : int
        0–7: rotate the y–x plane by ``transform % 4`` quarter turns, then flip left–right
        when ``transform >= 4``. Applied to both halves alike.

    Returns
    -------
    (input, target) : numpy.ndarray
        Each ``(pt, py, px)``, contiguous.
    """
    first, second = tile[0::2], tile[1::2]
    if swap:
        first, second = second, first

    def geometric(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a, k=transform % 4, axes=(1, 2))
        if transform >= 4:
            a = a[:, :, ::-1]
        return np.ascontiguousarray(a)

    return geometric(first), geometric(second)
