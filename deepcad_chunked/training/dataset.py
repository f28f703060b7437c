"""Torch datasets of tile pairs read lazily from OME-Zarr recordings.

Only store paths and small descriptions are pickled to DataLoader workers; each worker opens
the stores itself on first use and reads just the tiles it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from deepcad_chunked.io.omezarr import ARRAY_PATH
from deepcad_chunked.training.tiles import Region, TileDraw, draw, make_pair


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
    stores : list of str
        Recording stores, in the order ``Region.recording`` refers to.
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
    """

    def __init__(self, stores: list[str], regions: list[Region], tile: tuple[int, int, int],
                 seed: int, normalization: Normalization, augment: bool = True) -> None:
        self.stores = list(stores)
        self.regions = list(regions)
        self.tile = tile
        self.seed = seed
        self.normalization = normalization
        self.augment = augment
        self._arrays: dict[int, zarr.Array] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # never ship open stores to worker processes
        return state

    def __len__(self) -> int:
        return 2**62  # indices are global sample numbers; the sampler decides which are read

    def _array(self, recording: int) -> zarr.Array:
        array = self._arrays.get(recording)
        if array is None:
            array = zarr.open_array(f"{self.stores[recording]}/{ARRAY_PATH}", mode="r")
            self._arrays[recording] = array
        return array

    def read(self, d: TileDraw) -> np.ndarray:
        """The raw tile of a draw, ``(2·pt, py, px)``."""
        tt, ty, tx = self.tile
        index = (slice(d.t0, d.t0 + tt), *d.plane, slice(d.y0, d.y0 + ty),
                 slice(d.x0, d.x0 + tx))
        return self._array(d.recording)[index]

    def pair(self, d: TileDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (input, target) tensors ``(1, pt, py, px)`` of a draw."""
        tile = self.read(d).astype(np.float32)
        tile -= np.float32(self.normalization.mean)
        tile /= np.float32(self.normalization.std)
        first, second = make_pair(tile, d.swap, d.transform)
        return torch.from_numpy(first)[None], torch.from_numpy(second)[None]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair(draw(self.seed, int(index), self.regions, self.tile, self.augment))
