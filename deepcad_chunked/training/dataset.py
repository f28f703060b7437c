"""Torch datasets of tile pairs read lazily from OME-Zarr recordings.

Only store paths and small descriptions are pickled to DataLoader workers; each worker opens
the stores itself on first use and reads just the tiles it is asked for. Workers hand back
pairs in the recording's dtype (half the bytes of float32 for 16-bit data); :func:`make_pairs`
normalises a whole batch where it is used, on the GPU when training runs there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from deepcad_chunked.store.integrity import ArrayRef
from deepcad_chunked.training.tiles import (
    Region,
    TileDraw,
    Window,
    draw,
    draw_window,
    make_pair,
)


@dataclass(frozen=True)
class Normalization:
    """``(x - mean) / std`` applied to every tile, from whole-recording statistics."""

    mean: float
    std: float

    def as_dict(self) -> dict[str, float]:
        """JSON-ready form, as stored in checkpoints."""
        return {"mean": self.mean, "std": self.std}


class TilePairDataset(Dataset):
    """Sample ``i`` is the (input, target) pair of :func:`~deepcad_chunked.training.tiles.draw`.

    Parameters
    ----------
    stores : list of ArrayRef or str
        The recordings' full-resolution arrays (``Recording.array_ref``; a path or URL is
        read without refusing missing chunks), in the order
        ``Region.recording`` refers to.
    regions : list of Region
        Where tiles may be cut.
    tile : (frames, rows, columns)
        Tile size (``2·pt, py, px``).
    seed : int
        The run's seed.
    normalization : Normalization
        Applied to both halves.
    augment : bool
        Random swap and y–x transform (training) or none (validation).
    tiles_per_window : int
        Consecutive samples cut from one window (see
        :func:`~deepcad_chunked.training.tiles.draw_window`); 1: independent tiles.
    chunks : list of (t, y, x), optional
        Each store's chunk shape, which windows align to; needed when ``tiles_per_window > 1``.
    """

    def __init__(self, stores: list[ArrayRef | str], regions: list[Region],
                 tile: tuple[int, int, int], seed: int, normalization: Normalization,
                 augment: bool = True, tiles_per_window: int = 1,
                 chunks: list[tuple[int, int, int]] | None = None) -> None:
        if tiles_per_window > 1 and chunks is None:
            raise ValueError("windows need the storage chunk shape")
        self.stores = [s if isinstance(s, ArrayRef) else ArrayRef(str(s), strict=False)
                       for s in stores]
        self.regions = list(regions)
        self.tile = tile
        self.seed = seed
        self.normalization = normalization
        self.augment = augment
        self.tiles_per_window = tiles_per_window
        self.chunks = chunks
        self._arrays: dict[int, zarr.Array] = {}
        self._windows: OrderedDict[int, tuple[Window, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # never ship open stores or read data to worker processes
        state["_windows"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return 2**62  # indices are global sample numbers; the sampler decides which are read

    def _array(self, recording: int) -> zarr.Array:
        array = self._arrays.get(recording)
        if array is None:
            array = self.stores[recording].open()
            self._arrays[recording] = array
        return array

    def read(self, d: TileDraw) -> np.ndarray:
        """The raw tile of a draw, ``(2·pt, py, px)``."""
        tt, ty, tx = self.tile
        index = (slice(d.t0, d.t0 + tt), *d.plane, slice(d.y0, d.y0 + ty),
                 slice(d.x0, d.x0 + tx))
        return self._array(d.recording)[index]

    def _window(self, number: int) -> tuple[Window, np.ndarray]:
        """Window ``number`` and its samples, read once and kept for the next samples."""
        cached = self._windows.get(number)
        if cached is None:
            assert self.chunks is not None
            w = draw_window(self.seed, number, self.regions, self.tile, self.chunks)
            index = (*(slice(a, a + n) for a, n in zip(w.start, w.shape, strict=True)),)
            index = (index[0], *w.plane, *index[1:])
            cached = (w, self._array(w.recording)[index])
            self._windows[number] = cached
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        return cached

    def pair(self, d: TileDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (input, target) tensors ``(1, pt, py, px)`` of a draw, read from the store
        (validation; training batches go through :func:`make_pairs`)."""
        tile = self.read(d).astype(np.float32)
        tile -= np.float32(self.normalization.mean)
        tile /= np.float32(self.normalization.std)
        first, second = make_pair(tile, d.swap, d.transform)
        return torch.from_numpy(first)[None], torch.from_numpy(second)[None]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Raw (input, target) pair of sample ``index``: ``(2, pt, py, px)``, source dtype."""
        index = int(index)
        if self.tiles_per_window <= 1:
            d = draw(self.seed, index, self.regions, self.tile, self.augment)
            raw = self.read(d)
        else:
            window, samples = self._window(index // self.tiles_per_window)
            d = draw(self.seed, index, self.regions, self.tile, self.augment, window=window)
            t, y, x = (a - o for a, o in zip((d.t0, d.y0, d.x0), window.start, strict=True))
            tt, ty, tx = self.tile
            raw = samples[t:t + tt, y:y + ty, x:x + tx]
        if raw.dtype == np.uint32 or raw.dtype.itemsize > 4 or raw.dtype.kind not in "fiu":
            raw = raw.astype(np.float32)  # types torch cannot hold or convert exactly
        first, second = make_pair(raw, d.swap, d.transform)
        return torch.from_numpy(np.stack([first, second]))


def make_pairs(batch: torch.Tensor, normalization: Normalization
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise a batch of raw pairs and split it into (input, target).

    Parameters
    ----------
    batch : torch.Tensor
        ``(n, 2, pt, py, px)`` raw pairs from :class:`TilePairDataset`, on any device.
    normalization : Normalization
        Whole-recording mean and standard deviation.

    Returns
    -------
    (input, target) : torch.Tensor
        Each ``(n, 1, pt, py, px)`` float32, as :meth:`TilePairDataset.pair` gives them.
    """
    x = (batch.float() - normalization.mean) / normalization.std
    return x[:, 0:1], x[:, 1:2]
