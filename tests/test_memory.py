"""Fitting blocks and tiles to the memory of a task."""

from __future__ import annotations

import math

import pytest

from deepcad_chunked.config import FORWARD
from deepcad_chunked.errors import ConfigError
from deepcad_chunked.infer.memory import (
    CPU_FRACTION,
    bytes_per_voxel,
    fit_block,
    network_voxels,
    plan_tiles,
    worker_memory,
)


@pytest.mark.parametrize("core, halo, limit", [
    ((64, 96, 96), 48, (64 + 96) * 144 * 144),
    ((192, 384, 384), 48, 10_000_000),
    ((40, 8, 16), 16, 2 * 40 * 40 * 48),
    ((8, 8, 8), 0, 512),
])
def test_tiles_cover_the_core_once_and_fit(core, halo: int, limit: int) -> None:
    tiles = plan_tiles(core, halo, limit)
    covered = {}
    for tile in tiles:
        assert all(s.start % 8 == 0 and (s.stop - s.start) % 8 == 0 for s in tile)
        assert math.prod(s.stop - s.start + 2 * halo for s in tile) <= limit
        for t in range(tile[0].start, tile[0].stop, 8):
            for y in range(tile[1].start, tile[1].stop, 8):
                for x in range(tile[2].start, tile[2].stop, 8):
                    covered[(t, y, x)] = covered.get((t, y, x), 0) + 1
    assert len(covered) == math.prod(n // 8 for n in core)
    assert set(covered.values()) == {1}


def test_a_block_that_fits_is_one_tile_and_one_that_cannot_is_refused() -> None:
    assert plan_tiles((64, 64, 64), 48, 160**3) == [(slice(0, 64), slice(0, 64), slice(0, 64))]
    with pytest.raises(ConfigError, match="not even an 8-voxel tile"):
        plan_tiles((64, 64, 64), 48, 104**3 - 1)


def test_fit_block_takes_the_largest_that_fits_on_the_chunk_grid() -> None:
    shape, halo = (2000, 512, 512), 48
    kwargs = {"largest": (192, 384, 384), "step": (32, 128, 128), "slots": 4}
    roomy = fit_block(shape, halo, 10**9, **kwargs)
    assert roomy == (192, 384, 384)
    tight = fit_block(shape, halo, 20_000_000, **kwargs)
    assert math.prod(b + 2 * halo for b in tight) <= 20_000_000
    assert all(b % s == 0 for b, s in zip(tight, kwargs["step"], strict=True))
    assert network_voxels(shape, tight, halo) > network_voxels(shape, roomy, halo)
    # nothing fits: the smallest block on the grid (its task tiles it)
    assert fit_block(shape, halo, 1000, **kwargs) == (64, 128, 128)


def test_fit_block_keeps_workers_busy_and_covers_short_recordings() -> None:
    shape, halo = (256, 96, 96), 48
    kwargs = {"largest": (192, 384, 384), "step": (32, 32, 32)}
    one = fit_block(shape, halo, 10**9, slots=1, **kwargs)
    four = fit_block(shape, halo, 10**9, slots=4, **kwargs)
    assert one == (192, 96, 96)
    blocks = math.prod(math.ceil(n / b) for n, b in zip(shape, four, strict=True))
    assert blocks >= 4
    assert fit_block((37, 45, 53), halo, 10**9, slots=2, **kwargs) == (64, 64, 64)


def test_memory_estimates_grow_with_the_network_and_shrink_with_precision() -> None:
    assert bytes_per_voxel(16, "fp32", "cpu") > bytes_per_voxel(4, "fp32", "cpu")
    assert bytes_per_voxel(16, "bf16", "cuda") < bytes_per_voxel(16, "fp32", "cuda")
    # measured on the CPU, lean pass in an inference worker (module docstring)
    assert all(bytes_per_voxel(f, "fp32", "cpu") >= b
               for f, b in ((4, 52), (8, 104), (16, 352)))
    here = worker_memory("cpu")
    assert here["device"] == "cpu" and here["bytes"] > 2**20


def test_each_worker_reports_its_own_memory_limit_and_threads() -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, memory_limit="3GiB",
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        (got,) = client.run(worker_memory, "cpu").values()
    assert got == {"device": "cpu", "bytes": int(3 * 2**30 * CPU_FRACTION / 2), "slots": 2}
    # a worker with one forward slot runs one pass at a time, its other thread does I/O
    with LocalCluster(n_workers=1, threads_per_worker=2, memory_limit="3GiB",
                      resources={FORWARD: 1}, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        (got,) = client.run(worker_memory, "cpu").values()
    assert got == {"device": "cpu", "bytes": int(3 * 2**30 * CPU_FRACTION), "slots": 1}
