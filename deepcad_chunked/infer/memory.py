"""Memory of a forward pass: what it needs, what a worker may spend, and blocks that fit.

A forward pass of the U-Net over ``v`` input voxels keeps about ``v × bytes_per_voxel`` bytes
of activations alive at its peak. On the CPU inference runs the memory-lean pass
(:mod:`deepcad_chunked.infer.lean`, channels-last) in a worker whose allocator keeps freed
memory for the next pass (:data:`~deepcad_chunked.cluster.INFERENCE_MALLOC_ENV`). Its peak
after several passes — so with the heap's fragmentation, which depends on the order of the
allocations — measured on 160×352×352 inputs at ``f`` = 4, 8, 16: 52, 104 and 352 B per voxel
(``benchmarks/forward.py``; 199–213 at ``f`` = 16 in another order of the same passes), and
a whole inference worker peaked at 13.8 GiB with a largest input of 48.7 M voxels, 304 B per
voxel for all of the process (``benchmarks/cpu_split.py``); the estimate below covers the
largest pass. The GPU figures are
derived (eight full-resolution feature maps of ``f`` channels, in the precision's element
size), not measured yet.

Blocks are chosen so that one task's forward pass fits the worker's memory; a block that does
not fit (a user's choice, or a worker with less memory than the rest) is cut into tiles inside
its task by :func:`plan_tiles`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from itertools import product
from typing import Any

from deepcad_chunked.config import FORWARD
from deepcad_chunked.errors import ConfigError
from deepcad_chunked.model.unet3d import GRID

#: Fraction of a CPU worker's memory limit (per thread) one forward pass may use; the rest
#: holds the model, the task's input and output and the blocks queued on the worker, below
#: the 80 % at which distributed pauses a worker.
CPU_FRACTION = 0.6
#: Fraction of a GPU's total memory one forward pass may use.
GPU_FRACTION = 0.8


def bytes_per_voxel(features: int, precision: str, device: str) -> int:
    """Peak bytes per input voxel of one forward pass (an upper estimate).

    Parameters
    ----------
    features : int
        Feature maps of the network's first level.
    precision : {"fp32", "bf16", "fp16"}
        Arithmetic of the forward pass.
    device : {"cpu", "cuda"}
        Where it runs.
    """
    if device == "cpu":
        return 64 + 18 * features
    width = 4 if precision == "fp32" else 2
    return 10 * width * features + 64


def worker_memory(device: str = "auto", dask_worker: Any = None) -> dict[str, Any]:
    """What the calling process (a dask worker) may spend on one forward pass.

    Run on every worker with ``client.run``, which passes the worker as ``dask_worker``
    (``distributed.get_worker`` finds none outside a task). Deterministic for a given machine
    and cluster (the worker's memory limit, not what is free at the moment), so that a rerun
    picks the same blocks. Outside a worker: this machine's memory shared by its cores.

    Returns
    -------
    dict
        ``device`` ("cpu" or "cuda"), ``bytes`` for one forward pass and ``slots``, the
        passes the worker runs at once: its threads, or the :data:`~deepcad_chunked.config.FORWARD`
        resource it advertises (its other threads then only read and write).
    """
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        return {"device": "cuda", "bytes": int(total * GPU_FRACTION), "slots": 1}
    limit, threads = None, 1
    if dask_worker is not None:
        limit, threads = dask_worker.memory_manager.memory_limit, dask_worker.state.nthreads
        forward = (dask_worker.state.total_resources or {}).get(FORWARD)
        if forward:
            threads = min(threads, int(forward))
    if not limit:
        import psutil

        limit = psutil.virtual_memory().total // max(1, os.cpu_count() or 1)
    return {"device": "cpu", "bytes": int(limit * CPU_FRACTION / max(1, threads)),
            "slots": max(1, threads)}


def _splits(n: int, pieces: int) -> list[int]:
    """``n`` (a multiple of 8) cut into ``pieces`` parts of multiples of 8, largest first."""
    size = math.ceil(n / pieces / GRID) * GRID
    parts = [size] * (n // size)
    return parts + ([n % size] if n % size else [])


def plan_tiles(core: Sequence[int], halo: int, max_voxels: int) -> list[tuple[slice, ...]]:
    """Cut a block's core into the fewest tiles whose forward pass fits ``max_voxels``.

    Parameters
    ----------
    core : (t, y, x)
        The block without its halo; multiples of 8.
    halo : int
        Context each tile needs on every side.
    max_voxels : int
        Largest network input (tile plus halo) allowed.

    Returns
    -------
    list of tuple of slice
        The tiles, in core coordinates; a tile's input is the same slices widened by ``halo``
        (in block coordinates: shifted by nothing, extended by ``2 * halo``).

    Raises
    ------
    ConfigError
        When not even an 8-voxel tile with its halo fits.
    """
    counts = [1, 1, 1]
    while True:
        parts = [_splits(n, c) for n, c in zip(core, counts, strict=True)]
        if math.prod(p[0] + 2 * halo for p in parts) <= max_voxels:
            break
        # cut the axis whose largest part is longest (it shrinks the input the most)
        axis = max(range(3), key=lambda a: (parts[a][0], -a))
        if parts[axis][0] <= GRID:
            need = (GRID + 2 * halo) ** 3
            raise ConfigError(f"not even an {GRID}-voxel tile with a halo of {halo} fits in the "
                              f"memory allowed for one task ({need} voxels needed, "
                              f"{max_voxels} allowed); give workers more memory or use a "
                              "smaller --halo")
        counts[axis] += 1
    starts = [[sum(p[:i]) for i in range(len(p))] for p in parts]
    return [tuple(slice(s[i], s[i] + p[i]) for s, p, i in zip(starts, parts, idx, strict=True))
            for idx in product(*(range(len(p)) for p in parts))]


def _cores(n: int, block: int) -> list[int]:
    padded = n + (-n % GRID)
    return [block] * (padded // block) + ([padded % block] if padded % block else [])


def network_voxels(shape: Sequence[int], block: Sequence[int], halo: int) -> int:
    """Voxels passed through the network to denoise ``shape`` with ``block`` and ``halo``."""
    return math.prod(sum(c + 2 * halo for c in _cores(n, b))
                     for n, b in zip(shape, block, strict=True))


def fit_block(shape: Sequence[int], halo: int, max_voxels: int, *, largest: Sequence[int],
              step: Sequence[int], slots: int = 1) -> tuple[int, int, int]:
    """The block that denoises ``shape`` fastest within a task's memory.

    Candidates are multiples of ``step`` (the storage chunks, or 8) up to ``largest`` and at
    least the halo; among those whose input fits ``max_voxels``, the one with the least
    network work per parallel slot wins (total input voxels ÷ min(tasks, slots)), the larger
    block on ties.

    Parameters
    ----------
    shape : (t, y, x)
        The recording.
    halo : int
        Halo of every block.
    max_voxels : int
        Largest network input of one task.
    largest, step : (t, y, x)
        Upper bound and granularity of each axis.
    slots : int
        Tasks the cluster runs at once.
    """
    axes = []
    for n, top, s in zip(shape, largest, step, strict=True):
        whole = math.ceil((n + (-n % GRID)) / s) * s  # one block spans the axis
        floor = math.ceil(max(halo, 1) / s) * s
        sizes = [b for b in range(floor, min(top, whole - 1) + 1, s)]
        if whole <= max(top, floor):
            sizes.append(whole)
        axes.append(sizes or [floor])
    best, best_key = None, None
    for block in product(*axes):
        if math.prod(min(b, n + (-n % GRID)) + 2 * halo
                     for b, n in zip(block, shape, strict=True)) > max_voxels:
            continue
        tasks = math.prod(len(_cores(n, b)) for n, b in zip(shape, block, strict=True))
        key = (network_voxels(shape, block, halo) / min(tasks, slots), -math.prod(block))
        if best_key is None or key < best_key:
            best, best_key = block, key
    if best is None:  # nothing fits: the smallest block, tiled inside its task
        return tuple(a[0] for a in axes)
    return tuple(best)
