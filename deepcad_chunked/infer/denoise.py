"""Denoising a recording store block by block on a dask cluster, into a new OME-Zarr store.

The graph is: Zarr → dask array → whole-recording normalisation → ``map_overlap`` of the
network (:func:`~deepcad_chunked.infer.predict.denoise_dask`) → de-normalisation → cast →
one write task per output block, each leaving a marker. Only blocks without a marker enter
the graph, so a rerun after a kill skips finished blocks; dask re-runs the tasks of a worker
that dies. Planes and channels are denoised as independent ``t, y, x`` series.

Blocks are sized from the workers' memory (:func:`plan_layout`), and the graph is built and
submitted a segment of frames at a time, so neither memory nor the graph grows with the
length of the recording.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import dask
import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from deepcad_chunked._version import __version__
from deepcad_chunked.cluster import (
    advertises_gpus,
    compute_in_batches,
    connect,
    wait_for_a_worker,
)
from deepcad_chunked.config import DenoiseConfig
from deepcad_chunked.errors import ConfigError
from deepcad_chunked.infer.memory import (
    bytes_per_voxel,
    fit_block,
    plan_tiles,
    worker_memory,
)
from deepcad_chunked.infer.predict import (
    check_blocks,
    default_halo,
    denoise_dask,
    receptive_radius,
)
from deepcad_chunked.io.omezarr import (
    ARRAY_PATH,
    ATTRS_KEY,
    Compression,
    Recording,
    create_image,
    open_for_writing,
    open_recording,
    prepare_output,
    read_group_attrs,
    update_attrs,
)
from deepcad_chunked.io.resumable import (
    PROGRESS_DIR,
    can_resume,
    fingerprint,
    now,
    progress_dir,
    remove_partial_writes,
    writing,
)
from deepcad_chunked.model.checkpoint import Checkpoint
from deepcad_chunked.model.unet3d import GRID

log = logging.getLogger(__name__)

#: Largest blocks (t, y, x) per device kind; smaller ones are picked when a task's forward
#: pass would not fit the worker's memory (:func:`~deepcad_chunked.infer.memory.fit_block`).
#: With the default halo of 48 a long 512×512 recording is read 2.9× (GPU block) or 4.8× (CPU).
DEFAULT_BLOCKS = {"cpu": (64, 256, 256), "cuda": (192, 384, 384)}


@dataclass(frozen=True)
class Layout:
    """How a denoise job is cut: blocks, halo, tiles and segments.

    Attributes
    ----------
    block : (t, y, x)
        Core block of one task.
    halo : int
        Overlap on every side.
    device : {"cpu", "cuda"}
        What the workers run the network on.
    max_voxels : int
        Largest network input of one forward pass (bigger blocks are tiled in their task).
    pieces : (t, y, x)
        Shape of one written piece: the block, or the storage chunk when the block is off
        the chunk grid.
    segment : int
        Frames per segment: the unit in which the graph is built and submitted.
    """

    block: tuple[int, int, int]
    halo: int
    device: str
    max_voxels: int
    pieces: tuple[int, int, int]
    segment: int


def plan_layout(client: Client, rec: Recording, features: int,
                config: DenoiseConfig) -> Layout:
    """Choose blocks, tiles and segments for ``rec`` from the cluster's workers and memory.

    Raises
    ------
    ConfigError
        When ``--device cuda`` is asked of a worker without a GPU, no worker joins, or the
        block and halo cannot work.
    """
    workers = _worker_memory(client, config.device)
    device = "cuda" if all(w["device"] == "cuda" for w in workers.values()) else "cpu"
    if config.device == "cuda" and device != "cuda":
        cpu_only = sorted(a for a, w in workers.items() if w["device"] != "cuda")
        raise ConfigError(f"--device cuda was asked for but worker {cpu_only[0]} has no CUDA "
                          "device")
    if config.tile_memory:
        max_voxels = config.tile_memory // bytes_per_voxel(features, config.precision, device)
    else:
        max_voxels = min(w["bytes"] // bytes_per_voxel(features, config.precision, w["device"])
                         for w in workers.values())
    halo = default_halo() if config.halo is None else config.halo
    if halo < receptive_radius():
        log.warning("halo %d is smaller than the network's receptive radius (%d): the result "
                    "is no longer exact and block borders may show; the default halo %d is "
                    "exact", halo, receptive_radius(), default_halo())
    frames_yx = (rec.shape[0], rec.shape[-2], rec.shape[-1])
    storage = (rec.chunks[0], rec.chunks[-2], rec.chunks[-1])
    slots = (len(workers) if device == "cuda"
             else sum(client.nthreads().values()) or len(workers))
    block = config.block or fit_block(frames_yx, halo, max_voxels,
                                      largest=DEFAULT_BLOCKS[device],
                                      step=tuple(c if c % 8 == 0 else 8 for c in storage),
                                      slots=slots)
    check_blocks(block, halo, frames_yx)
    cores = [min(b, n + (-n % GRID)) for b, n in zip(block, frames_yx, strict=True)]
    tiles = len(plan_tiles(cores, halo, max_voxels))  # refuses a memory too small for any
    if tiles > 1:
        log.info("a block needs more memory than a task may use: each is cut into %d tiles "
                 "inside its task (a smaller --block, or more memory per worker, avoids "
                 "the extra halos)", tiles)
    aligned = not any(b % c for b, c in zip(block, storage, strict=True))
    pieces = block if aligned else storage
    # a segment: whole blocks and whole chunks, with work for every slot about twice over
    unit = math.lcm(block[0], pieces[0])
    per_frame_row = math.prod(math.ceil(n / b) for n, b in zip(frames_yx[1:], block[1:],
                                                                strict=True))
    rows = math.ceil(max(4, 2 * slots) / per_frame_row)
    return Layout(block=tuple(block), halo=halo, device=device, max_voxels=int(max_voxels),
                  pieces=tuple(pieces), segment=math.ceil(rows * block[0] / unit) * unit)


def _worker_memory(client: Client, device: str) -> dict[str, dict[str, Any]]:
    wait_for_a_worker(client)
    return client.run(worker_memory, device)


def _write_block(data: np.ndarray, store: str, region: tuple[slice, ...],
                 marker: str) -> int:
    """Write one finished block to the output store, then leave its marker."""
    open_for_writing(store)[region] = data
    tmp = Path(marker + ".tmp")
    tmp.write_bytes(b"")
    tmp.replace(marker)
    return int(data.size)


def _cast(x: Any, dtype: np.dtype) -> Any:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return x.round().clip(info.min, info.max).astype(dtype)
    return x.astype(dtype)


def denoise(data: str | Path, model: str | Path, output: str | Path, *,
            config: DenoiseConfig | None = None, cluster: str | Client | None = "local",
            workers: int | None = None, progress: bool | None = None) -> Recording:
    """Denoise a recording with a trained network, block by block, into a new store.

    The recording is done a segment of frames at a time (a few blocks per worker), each
    segment's graph built and submitted while the previous one finishes: the driver and the
    scheduler hold a bounded graph however long the recording is.

    Parameters
    ----------
    data : str or Path
        A complete recording store.
    model : str or Path
        A checkpoint written by training.
    output : str or Path
        The OME-Zarr store to write (same axes, scales and chunks as the input).
    config : DenoiseConfig, optional
        Block, halo, device, precision, output dtype, memory of a forward pass, overwrite.
    cluster : str or Client, optional
        ``"local"`` (default), a scheduler address, or a Client.
    workers : int, optional
        Worker processes of a local cluster.
    progress : bool, optional
        Progress bar; default: when standard error is a terminal.

    Returns
    -------
    Recording
        The finished output store.
    """
    config = config or DenoiseConfig()
    rec = open_recording(data)
    rec.require_finite()
    model_path = Path(model).expanduser().absolute()
    ckpt = Checkpoint.load(model_path)
    ckpt.build_model()  # refuses weights that do not fit their declared network
    output = Path(output).expanduser().absolute()
    if config.block is not None:  # fail before starting a cluster
        check_blocks(config.block, default_halo() if config.halo is None else config.halo,
                     (rec.shape[0], rec.shape[-2], rec.shape[-1]))
    out_dtype = rec.dtype if config.dtype == "same" else np.dtype(np.float32)
    with connect(cluster, workers=workers) as client:
        layout = plan_layout(client, rec, ckpt.features, config)
        job_id = fingerprint({"input": str(rec.path.absolute()),
                              "input_job": rec.attrs.get("job"), "model": ckpt.digest,
                              "block": layout.block, "halo": layout.halo,
                              "precision": config.precision, "dtype": out_dtype.str})
        markers = progress_dir(output, "denoise")
        if can_resume(output, "denoise", job_id, config.overwrite):
            log.info("resuming the unfinished denoise in %s", output)
            remove_partial_writes(output / ARRAY_PATH)
        else:
            _create_output(output, rec, out_dtype, job_id, ckpt.digest, model_path, layout,
                           config)
            markers.mkdir(parents=True)
        job = _Job(rec, model_path, output, markers, layout, out_dtype, config,
                   gpu=advertises_gpus(client))
        todo, total = job.count()
        log.info("denoising %s with %s on %s (block %s, halo %d, segments of %d frames): "
                 "%d of %d blocks to do", rec.path, model_path.name, layout.device,
                 layout.block, layout.halo, layout.segment, todo, total)
        if todo:
            with writing(output):
                _run(client, job.segments(), job.per_segment(), total, total - todo,
                     progress)
    provenance = {**read_group_attrs(output)[ATTRS_KEY]["provenance"], "completed": now()}
    update_attrs(output, provenance=provenance, complete=True)
    shutil.rmtree(output / PROGRESS_DIR, ignore_errors=True)
    return open_recording(output)


def _create_output(output: Path, rec: Recording, dtype: np.dtype, job_id: str, digest: str,
                   model_path: Path, layout: Layout, config: DenoiseConfig) -> None:
    prepare_output(output, config.overwrite)
    scale = rec.ome["datasets"][0]["coordinateTransformations"][0]["scale"]
    units = {a["name"]: a.get("unit") for a in rec.ome["axes"]}
    keep = ("frame_interval_s", "frame_rate_hz", "pixel_size_um", "z_spacing_um")
    attrs = {
        "format": 1, "kind": "denoised", "complete": False,
        "job": {"command": "denoise", "fingerprint": job_id},
        **{k: rec.attrs.get(k) for k in keep},
        "model": {"path": str(model_path), "digest": digest},
        "parameters": {"block": list(layout.block), "halo": layout.halo,
                       "precision": config.precision, "dtype": dtype.name,
                       "device": layout.device},
        "provenance": {"tool": "deepcad-chunked", "version": __version__, "started": now(),
                       "host": socket.gethostname(), "input": str(rec.path.absolute())},
    }
    create_image(output, shape=rec.shape, dtype=dtype, chunks=rec.chunks, axes=rec.axes,
                 scale=scale, units=units, zarr_format=rec.zarr_format,
                 compression=Compression(), attrs=attrs)


@dataclass
class _Job:
    """The pieces of a denoise job and, segment by segment, the graphs that write them."""

    rec: Recording
    model_path: Path
    output: Path
    markers: Path
    layout: Layout
    dtype: np.dtype
    config: DenoiseConfig
    gpu: bool
    source: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.source = self.rec.to_dask()

    def _marker(self, plane: tuple[int, ...], index: tuple[int, ...]) -> Path:
        """The marker of the piece ``index`` (in whole-recording piece units) of ``plane``."""
        return self.markers / ("_".join(map(str, (*plane, *index))) + ".done")

    def _planes(self) -> list[tuple[int, ...]]:
        return list(product(*(range(n) for n in self.rec.shape[1:-2])))

    def _frames(self) -> list[tuple[int, int]]:
        n, step = self.rec.shape[0], self.layout.segment
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def _markers(self, plane: tuple[int, ...], frames: tuple[int, int]) -> Iterator[Path]:
        pieces = self.layout.pieces
        counts = [math.ceil(n / p) for n, p in zip((self.rec.shape[-2], self.rec.shape[-1]),
                                                    pieces[1:], strict=True)]
        first, last = frames[0] // pieces[0], math.ceil(frames[1] / pieces[0])
        for index in product(range(first, last), *map(range, counts)):
            yield self._marker(plane, index)

    def per_segment(self) -> int:
        """Pieces in a full segment (per plane)."""
        return len(list(self._markers((), (0, min(self.layout.segment, self.rec.shape[0])))))

    def count(self) -> tuple[int, int]:
        """Pieces still to write, and all pieces."""
        markers = [m for plane in self._planes() for frames in self._frames()
                   for m in self._markers(plane, frames)]
        return sum(not m.exists() for m in markers), len(markers)

    def segments(self) -> Iterator[list[Any]]:
        """One list of delayed writes per segment with unfinished pieces, built lazily."""
        for plane in self._planes():
            for frames in self._frames():
                if all(m.exists() for m in self._markers(plane, frames)):
                    continue
                yield self._segment(plane, frames)

    def _segment(self, plane: tuple[int, ...], frames: tuple[int, int]) -> list[Any]:
        layout = self.layout
        series = self.source[(slice(None), *plane)]
        with dask.annotate(resources={"GPU": 1}) if self.gpu else nullcontext():
            out = denoise_dask(series, self.model_path, block=layout.block, halo=layout.halo,
                               device=self.config.device, precision=self.config.precision,
                               frames=frames, max_voxels=layout.max_voxels,
                               recording_mean=(self.rec.statistics or {}).get("mean"))
        out = _cast(out, self.dtype)
        if layout.pieces != layout.block:
            out = out.rechunk(layout.pieces)  # a block off the chunk grid: write whole chunks
        pieces = out.to_delayed()
        tasks = []
        offset = (frames[0], 0, 0)
        starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in out.chunks]
        for index in product(*(range(len(c)) for c in out.chunks)):
            region = tuple(slice(o + int(s[i]), o + int(s[i]) + c[i])
                           for o, s, c, i in zip(offset, starts, out.chunks, index, strict=True))
            marker = self._marker(plane, (index[0] + frames[0] // layout.pieces[0], *index[1:]))
            if marker.exists():
                continue
            full = (region[0], *plane, *region[1:])
            tasks.append(dask.delayed(_write_block)(pieces[index], str(self.output), full,
                                                    str(marker),
                                                    dask_key_name=f"write-{marker.stem}"))
        return tasks


def _run(client: Client, segments: Iterator[list[Any]], in_flight: int, total: int,
         done: int, progress: bool | None) -> None:
    bar = tqdm(total=total, initial=done, unit="block", desc="denoise",
               disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        for voxels in compute_in_batches(client, segments, in_flight=in_flight):
            bar.update(1)
            rate = (bar.format_dict.get("rate") or 0.0) * voxels
            bar.set_postfix_str(f"{rate / 1e6:.1f} Mvoxel/s", refresh=False)
    finally:
        bar.close()
