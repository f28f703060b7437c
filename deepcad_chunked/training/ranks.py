"""A process's share of a data-parallel run: its rank, its samples, the steps all ranks take
together.

Rank ``r`` of ``n`` takes samples ``step·B + r·B/n … step·B + (r+1)·B/n − 1`` of the same
stateless sampler, so a run is still a pure function of the seed and the sample number, and
``DistributedDataParallel`` averages the gradients: the weights are those of one process with
the batch of ``B`` tiles, to float rounding. The processes are started by
:mod:`deepcad_chunked.training.processes`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepcad_chunked.errors import TrainingError

#: What the other ranks raise when rank 0 failed at the end of an epoch.
MAIN_STOPPED = "the main training process stopped"


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel run."""

    index: int
    size: int

    @property
    def main(self) -> bool:
        """Whether this process validates and writes the checkpoints."""
        return self.index == 0


class RankSampler(torch.utils.data.Sampler[int]):
    """The global sample numbers of one rank's share of the steps ``start … stop − 1``.

    Parameters
    ----------
    start, stop : int
        Optimiser steps (over the whole run).
    batch : int
        Tiles per step, all ranks together.
    rank : Rank
    """

    def __init__(self, start: int, stop: int, batch: int, rank: Rank) -> None:
        self.start, self.stop, self.batch, self.rank = start, stop, batch, rank
        self.share = batch // rank.size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            first = step * self.batch + self.rank.index * self.share
            yield from range(first, first + self.share)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.share


def mean_over_ranks(value: float, rank: Rank | None) -> float:
    """``value`` averaged over the ranks (itself in a single process)."""
    if rank is None or rank.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / rank.size


def agree(failure: BaseException | None, rank: Rank | None) -> None:
    """Stop every rank when rank 0 failed at the end of an epoch (raise its error there)."""
    if rank is not None and rank.size > 1:
        flag = torch.tensor([failure is not None], dtype=torch.int32)
        dist.broadcast(flag, 0)
        if flag.item() and failure is None:
            raise TrainingError(MAIN_STOPPED)
    if failure is not None:
        raise failure


