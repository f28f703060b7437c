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
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import dask
import numpy as np
from distributed import Client

from deepcad_chunked._version import __version__
from deepcad_chunked.cluster import (
    INFERENCE_RESOURCES,
    connect,
    forward_resources,
    inference_workers,
)
from deepcad_chunked.config import INFERENCE_THREADS, CompressionConfig, DenoiseConfig
from deepcad_chunked.errors import ConfigError
from deepcad_chunked.infer.kernels import stored_samples
from deepcad_chunked.infer.memory import (
    bytes_per_voxel,
    fit_block,
    network_voxels,
    plan_tiles,
    worker_memory,
)
from deepcad_chunked.infer.predict import (
    check_blocks,
    check_halo,
    default_halo,
    denoise_dask,
    receptive_radius,
)
from deepcad_chunked.jobs.runner import compute_in_batches
from deepcad_chunked.launchers import wait_for_a_worker
from deepcad_chunked.model.checkpoint import Checkpoint
from deepcad_chunked.model.unet3d import GRID
from deepcad_chunked.progress import progress_bar
from deepcad_chunked.store.attributes import read_ours
from deepcad_chunked.store.lifecycle import StoreJob, now, open_store, writing
from deepcad_chunked.store.location import StorePath, file_state, resolve, write_atomic
from deepcad_chunked.store.omezarr import (
    create_image,
    open_for_writing,
)
from deepcad_chunked.store.pins import StorePin, check_disjoint, store_identity
from deepcad_chunked.store.recording import Recording, open_recording

log = logging.getLogger(__name__)

#: Largest blocks (t, y, x) per device kind; smaller ones are picked when a task's forward
#: pass would not fit the worker's memory (:func:`~deepcad_chunked.infer.memory.fit_block`).
#: A CPU worker runs one block at a time on every core with the machine's memory
#: (:func:`~deepcad_chunked.cluster.inference_workers`): with the default halo of 48 a long
#: 512×512 recording at f = 16 is passed 2.7× through the network on a 24 GiB machine
#: (224×256×256 blocks), 2.9× with the GPU block.
DEFAULT_BLOCKS = {"cpu": (256, 512, 512), "cuda": (192, 384, 384)}


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
    workers, device, max_voxels = forward_budget(client, features, config)
    halo = default_halo() if config.halo is None else config.halo
    frames_yx = (rec.shape[0], rec.shape[-2], rec.shape[-1])
    storage = (rec.chunks[0], rec.chunks[-2], rec.chunks[-1])
    slots = sum(w["slots"] for w in workers.values()) or len(workers)
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
    if halo < receptive_radius():  # said once every check has passed: never before an error
        log.warning("halo %d is smaller than the network's receptive radius (%d): the result "
                    "is no longer exact and block borders may show; the default halo %d is "
                    "exact", halo, receptive_radius(), default_halo())
    return Layout(block=tuple(block), halo=halo, device=device, max_voxels=int(max_voxels),
                  pieces=tuple(pieces), segment=math.ceil(rows * block[0] / unit) * unit)


def forward_budget(client: Client, features: int, config: DenoiseConfig
                   ) -> tuple[dict[str, dict[str, Any]], str, int]:
    """The workers' memory, the device they run the network on, and the largest network
    input (voxels) one forward pass may take.

    Raises
    ------
    ConfigError
        When ``--device cuda`` is asked of a worker without a GPU, or no worker joins.
    """
    wait_for_a_worker(client)
    workers = client.run(worker_memory, config.device)
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
    return workers, device, int(max_voxels)


def _write_block(data: np.ndarray, store: str, region: tuple[slice, ...], marker: str,
                 dtype: str, precision: str) -> int:
    """Check one finished block (float32, raw units), cast it to the output's dtype, write it
    to the output store, then leave its marker."""
    open_for_writing(store)[region] = stored_samples(data, dtype, precision)
    write_atomic(resolve(marker), b"")
    return int(data.size)


def denoise(data: str | Path, model: str | Path, output: str | Path, *,
            config: DenoiseConfig | None = None, cluster: str | Client | None = "local",
            workers: int | None = None, progress: bool | None = None,
            axes: str | None = None) -> Recording:
    """Denoise a recording with a trained network, block by block, into a new store.

    The recording is done a segment of frames at a time (a few blocks per worker), each
    segment's graph built and submitted while the previous one finishes: the driver and the
    scheduler hold a bounded graph however long the recording is.

    Parameters
    ----------
    data : str or Path
        A complete recording store, an OME-Zarr image written by another tool, or a plain
        Zarr array (with ``axes``): a local path or an fsspec URL.
    model : str or Path
        A checkpoint written by training (a local path or a URL).
    output : str or Path
        The OME-Zarr store to write (same axes, scales and chunks as the input), local or
        an fsspec URL (``s3://bucket/denoised.zarr``).
    config : DenoiseConfig, optional
        Block, halo, device, precision, output dtype, memory of a forward pass, overwrite.
    cluster : str or Client, optional
        ``"local"`` (default), a scheduler address, or a Client.
    workers : int, optional
        Worker processes of a local cluster; default one, running the network on every core
        (:func:`~deepcad_chunked.cluster.inference_workers`).
    progress : bool, optional
        Progress bar; default: when standard error is a terminal.
    axes : str, optional
        Axis names of a plain Zarr array that does not name them (``"tyx"``).

    Returns
    -------
    Recording
        The finished output store.
    """
    config = config or DenoiseConfig()
    rec = open_recording(data, axes=axes).with_statistics()
    rec.require_finite()
    model_path = resolve(model)
    ckpt = Checkpoint.load(model_path)
    ckpt.build_model()  # refuses weights that do not fit their declared network
    model_state = file_state(model_path)
    output = resolve(output)
    check_disjoint(output, [rec.path, model_path])  # before a cluster is started
    # every option that can be checked without the workers is checked before the cluster
    halo = default_halo() if config.halo is None else check_halo(config.halo)
    if config.block is not None:
        check_blocks(config.block, halo, (rec.shape[0], rec.shape[-2], rec.shape[-1]))
    out_dtype = rec.dtype if config.dtype == "same" else np.dtype(np.float32)
    stored = _unfinished_block(output, config)
    local: dict[str, Any] = {}
    if cluster in (None, "local"):  # one process on every core: the largest blocks
        workers, env = inference_workers(workers)
        local = {"worker_env": env, "threads_per_worker": INFERENCE_THREADS,
                 "resources": INFERENCE_RESOURCES}
    with connect(cluster, workers=workers, **local) as client:
        layout = plan_layout(client, rec, ckpt.features,
                             config if stored is None else config.model_copy(
                                 update={"block": stored}))
        identity = {"input": str(rec.path), "input_store": store_identity(rec.path),
                    "model": ckpt.digest, "block": list(layout.block), "halo": layout.halo,
                    "precision": config.precision, "dtype": out_dtype.str}
        with open_store(output, command="denoise", identity=identity,
                        inputs=[rec.path, model_path], overwrite=config.overwrite,
                        pins=[StorePin(rec.path)]) as store:
            if not store.resuming:
                store.create(lambda: _create_output(output, rec, out_dtype, store, ckpt.digest,
                                                    model_path, layout, config))
            pinned = pin_model(store, ckpt)
            job = _Job(rec, pinned, output, store.progress, layout, out_dtype, config,
                       resources=forward_resources(client),
                       pinned=(ckpt.normalization, ckpt.digest),
                       check=store.check)
            todo, total = job.count()
            series = (rec.shape[0], rec.shape[-2], rec.shape[-1])
            log.info("denoising %s with %s on %s (block %s, halo %d: the network passes "
                     "over each voxel %.2f times; segments of %d frames): %d of %d blocks "
                     "to do", rec.path, model_path.name, layout.device, layout.block,
                     layout.halo, network_voxels(series, layout.block, layout.halo)
                     / math.prod(series), layout.segment, todo, total)
            if todo:
                with writing(output):
                    _run(client, job.segments(), job.per_segment(), total, total - todo,
                         progress)
            store.finalise()
    if _changed(model_path, model_state):
        log.warning("%s changed while the job ran; %s was made entirely with the model as it "
                    "was at the start (digest %s…)", model_path, output, ckpt.digest[:12])
    return open_recording(output)


def _changed(path: StorePath, state: dict[str, Any]) -> bool:
    try:
        return file_state(path) != state
    except OSError:
        return True


def _unfinished_block(output: StorePath, config: DenoiseConfig
                      ) -> tuple[int, int, int] | None:
    """The block of an unfinished denoise in ``output``, to resume it with the same one
    (the default block depends on the workers, which may differ from the first run's)."""
    if config.block is not None or config.overwrite:
        return None
    ours = read_ours(output) if output.is_dir() else None
    if ours is None or ours.complete:
        return None
    block = ours.job.identity.get("block")
    return tuple(block) if isinstance(block, list) and len(block) == 3 else None


#: Name of the job's own copy of the model, in its progress folder.
PINNED_MODEL = "model.pt"


def pin_model(store: StoreJob, ckpt: Checkpoint) -> StorePath:
    """The job's own copy of the network, which every worker loads: replacing the user's model
    file while the job runs (a training run rewriting ``last.pt``) cannot mix two models."""
    pinned = store.progress / PINNED_MODEL
    if pinned.is_file() and Checkpoint.load(pinned).digest == ckpt.digest:
        return pinned
    with writing(store.path):
        Checkpoint(model_state=ckpt.model_state, features=ckpt.features,
                   normalization=ckpt.normalization, config=ckpt.config, epoch=ckpt.epoch,
                   step=ckpt.step).save(pinned)
    return pinned


def _create_output(output: StorePath, rec: Recording, dtype: np.dtype, store: StoreJob,
                   digest: str, model_path: StorePath, layout: Layout,
                   config: DenoiseConfig) -> None:
    chunks, shards = output_layout(rec, layout)
    create_denoised(output, rec, shape=rec.shape, dtype=dtype, chunks=chunks, shards=shards,
                    store=store, model_path=model_path, digest=digest,
                    parameters={"block": list(layout.block), "halo": layout.halo,
                                "precision": config.precision, "dtype": dtype.name,
                                "device": layout.device},
                    input=str(rec.path.absolute()))


def create_denoised(output: StorePath, rec: Recording, *, shape: tuple[int, ...],
                    dtype: np.dtype, chunks: tuple[int, ...], shards: tuple[int, ...] | None,
                    store: StoreJob, model_path: StorePath, digest: str,
                    parameters: dict[str, Any], **provenance: Any) -> None:
    """Create the (empty, unfinished) store of a denoised recording: the input's axes, scales
    and physical sizes, the model and the job's parameters, ``provenance`` added to the
    tool, version, start time and host."""
    scale = rec.ome["datasets"][0]["coordinateTransformations"][0]["scale"]
    units = {a["name"]: a.get("unit") for a in rec.ome["axes"]}
    keep = ("frame_interval_s", "frame_rate_hz", "pixel_size_um", "z_spacing_um", "origin")
    attrs = {
        "format": 1, "kind": "denoised", "complete": False,
        "job": store.job_attrs(),
        **{k: rec.attrs.get(k) for k in keep},
        "model": {"path": str(model_path), "digest": digest},
        "parameters": parameters,
        "provenance": {"tool": "deepcad-chunked", "version": __version__, "started": now(),
                       "host": socket.gethostname(), **provenance},
    }
    create_image(output, shape=shape, dtype=dtype, chunks=chunks, axes=rec.axes,
                 scale=scale, units=units, zarr_format=rec.zarr_format,
                 compression=CompressionConfig(), attrs=attrs, shards=shards)


def output_layout(rec: Recording, layout: Layout
                  ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Chunks and shards of a denoised store.

    The chunks are the input's (one plane each, as every plane is written by its own tasks);
    a sharded input gets a sharded output whose shards are the blocks, so each write task
    writes exactly one shard. Blocks off the chunk grid give an unsharded output, written a
    chunk at a time.
    """
    chunks = (rec.chunks[0], *(1,) * (len(rec.shape) - 3), rec.chunks[-2], rec.chunks[-1])
    if rec.shards is None or layout.pieces != layout.block:
        return chunks, None
    block = layout.block
    return chunks, (block[0], *(1,) * (len(rec.shape) - 3), block[1], block[2])


@dataclass
class _Job:
    """The pieces of a denoise job and, segment by segment, the graphs that write them."""

    rec: Recording
    model_path: StorePath
    output: StorePath
    markers: StorePath
    layout: Layout
    dtype: np.dtype
    config: DenoiseConfig
    #: what each forward pass holds on a worker (:func:`~deepcad_chunked.cluster.forward_resources`)
    resources: dict[str, float] | None
    #: the model's (normalisation, digest), read once by the driver
    pinned: tuple[dict[str, Any], str] | None = None
    #: called before each segment is submitted (the store's lock and pinned inputs)
    check: Callable[[], None] | None = None
    source: Any = field(init=False, repr=False)
    #: names of the markers there were when the job was counted (one listing, not one
    #: request per marker: the store may be in an object store)
    done: set[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.source = self.rec.to_dask()
        self.done = {m.name for m in self.markers.glob("*.done")}

    def _marker(self, plane: tuple[int, ...], index: tuple[int, ...]) -> StorePath:
        """The marker of the piece ``index`` (in whole-recording piece units) of ``plane``."""
        return self.markers / ("_".join(map(str, (*plane, *index))) + ".done")

    def _planes(self) -> list[tuple[int, ...]]:
        return list(product(*(range(n) for n in self.rec.shape[1:-2])))

    def _frames(self) -> list[tuple[int, int]]:
        n, step = self.rec.shape[0], self.layout.segment
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def _markers(self, plane: tuple[int, ...], frames: tuple[int, int]
                 ) -> Iterator[StorePath]:
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
        return sum(m.name not in self.done for m in markers), len(markers)

    def segments(self) -> Iterator[list[Any]]:
        """One list of delayed writes per segment with unfinished pieces, built lazily."""
        for plane in self._planes():
            for frames in self._frames():
                if all(m.name in self.done for m in self._markers(plane, frames)):
                    continue
                if self.check is not None:
                    self.check()  # still ours, and the input still the one pinned
                yield self._segment(plane, frames)

    def _segment(self, plane: tuple[int, ...], frames: tuple[int, int]) -> list[Any]:
        layout = self.layout
        series = self.source[(slice(None), *plane)]
        out = denoise_dask(series, self.model_path, block=layout.block, halo=layout.halo,
                           device=self.config.device, precision=self.config.precision,
                           frames=frames, max_voxels=layout.max_voxels,
                           recording_mean=(self.rec.statistics or {}).get("mean"),
                           pinned=self.pinned, resources=self.resources)
        if layout.pieces != layout.block:
            out = out.rechunk(layout.pieces)  # a block off the chunk grid: write whole chunks
        # unoptimised: fusion would merge the reads into the forward passes and drop the
        # resources (the reads are fused already, by denoise_dask)
        pieces = out.to_delayed(optimize_graph=False)
        tasks = []
        offset = (frames[0], 0, 0)
        starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in out.chunks]
        for index in product(*(range(len(c)) for c in out.chunks)):
            region = tuple(slice(o + int(s[i]), o + int(s[i]) + c[i])
                           for o, s, c, i in zip(offset, starts, out.chunks, index, strict=True))
            marker = self._marker(plane, (index[0] + frames[0] // layout.pieces[0], *index[1:]))
            if marker.name in self.done:
                continue
            full = (region[0], *plane, *region[1:])
            tasks.append(dask.delayed(_write_block)(pieces[index], str(self.output), full,
                                                    str(marker), self.dtype.str,
                                                    self.config.precision,
                                                    dask_key_name=f"write-{marker.stem}"))
        return tasks


def _run(client: Client, segments: Iterator[list[Any]], in_flight: int, total: int,
         done: int, progress: bool | None) -> None:
    bar = progress_bar(total, initial=done, unit="block", desc="denoise", progress=progress)
    try:
        for voxels in compute_in_batches(client, segments, in_flight=in_flight):
            bar.update(1)
            rate = (bar.format_dict.get("rate") or 0.0) * voxels
            bar.set_postfix_str(f"{rate / 1e6:.1f} Mvoxel/s", refresh=False)
    finally:
        bar.close()
