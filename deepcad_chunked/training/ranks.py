"""A process's share of a data-parallel run: its rank, its samples, the steps all ranks take
together.

Rank ``r`` of ``n`` takes samples ``step·B + r·B/n … step·B + (r+1)·B/n − 1`` of the same
stateless sampler, so a run is still a pure function of the seed and the sample number, and
``DistributedDataParallel`` averages the gradients: the weights are those of one process with
the batch of ``B`` tiles, to float rounding. The processes are started by
:mod:`deepcad_chunked.training.processes`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepcad_chunked.errors import ConfigError, TrainingError

#: What the other ranks raise when rank 0 failed at the end of an epoch.
MAIN_STOPPED = "the main training process stopped"


#: What a launcher of one process per device (``torchrun``, ``srun`` with these set by a job
#: script) tells each process: its rank among all, their number, where rank 0 waits for them.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel run.

    ``local`` is its index among the processes of its node (the GPU it uses) and
    ``local_size`` their number; None where the run is on one node (``index``, ``size``).
    """

    index: int
    size: int
    local: int | None = None
    local_size: int | None = None

    @property
    def main(self) -> bool:
        """Whether this process validates and writes the checkpoints."""
        return self.index == 0

    @property
    def device(self) -> int:
        """The index of this process's GPU on its node."""
        return self.index if self.local is None else self.local

    @property
    def on_node(self) -> int:
        """How many processes of the run share this process's node."""
        return self.size if self.local_size is None else self.local_size


def launched(environ: Mapping[str, str] | None = None) -> Rank | None:
    """This process's rank when a launcher started it as one of several (``torchrun``, or a
    batch job setting :data:`LAUNCH_VARIABLES`, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``).

    Parameters
    ----------
    environ : mapping, optional
        The environment (default: this process's).

    Returns
    -------
    Rank or None
        None when the variables are not all set or the launch is of one process.

    Raises
    ------
    ConfigError
        Variables that are not whole numbers, or a rank outside the run.
    """
    env = os.environ if environ is None else environ
    if not all(env.get(k) for k in LAUNCH_VARIABLES):
        return None
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    try:
        index, size, local, local_size = (int(env[k]) if env.get(k) else None for k in names)
    except ValueError:
        raise ConfigError("the launch variables " + ", ".join(
            f"{k}={env.get(k, '')!r}" for k in names) + " are not whole numbers") from None
    assert index is not None and size is not None
    if size == 1:
        return None
    if not 0 <= index < size or (local is not None and local_size is not None
                                  and not 0 <= local < local_size):
        raise ConfigError(f"the launch variables say rank {index} of {size} (local "
                          f"{local} of {local_size}): not a rank of the run")
    return Rank(index, size, local, local_size)


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


