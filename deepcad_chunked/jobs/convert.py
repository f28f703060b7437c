"""Lossless, out-of-core, resumable conversion of recordings into OME-Zarr.

The sources are any format :mod:`deepcad_chunked.sources.registry` reads (TIFF, HDF5, NWB, Suite2p,
raw binary). The recording is cut into *slabs*: one shard's worth of frames (one chunk's in an
unsharded store) across the whole frame. Each slab is one task on the dask cluster: it reads its
frames from the source file(s), writes them to the store (whole shards, so no two tasks touch
one file), summarises them for the whole-recording statistics and leaves a marker with that
summary. A rerun after an interruption skips slabs that have a marker; the statistics and
completion flag are written last.
"""

from __future__ import annotations

import json
import logging
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from distributed import Client

from deepcad_chunked._version import __version__
from deepcad_chunked.cluster import connect
from deepcad_chunked.config import DEFAULT_CHUNKS, SHARD_BYTES, ConvertConfig
from deepcad_chunked.errors import ConfigError, SourceError
from deepcad_chunked.jobs.runner import run_pieces
from deepcad_chunked.progress import progress_bar
from deepcad_chunked.sources.reader import Part, PhysicalMetadata, SourcePlan
from deepcad_chunked.sources.registry import open_sources
from deepcad_chunked.store.integrity import zarr_target
from deepcad_chunked.store.lifecycle import StoreJob, describe_change, now, open_store, writing
from deepcad_chunked.store.location import RemotePath, StorePath, file_state, is_url, resolve
from deepcad_chunked.store.omezarr import ARRAY_PATH, AXIS_UNITS, create_image, open_for_writing
from deepcad_chunked.store.pins import check_disjoint
from deepcad_chunked.store.recording import Recording, open_recording
from deepcad_chunked.store.stats import BlockStats

log = logging.getLogger(__name__)

#: File in a conversion's progress folder with the state (inode, times) of each source file.
SOURCE_STATES = "sources.json"


@dataclass(frozen=True)
class _SlabJob:
    """What every slab task needs; scattered to the workers once."""

    plan: SourcePlan
    store: str
    slab_frames: int
    progress: str


def _convert_slab(slab: int, job: _SlabJob) -> tuple[int, int, BlockStats]:
    """Copy one slab into the store; returns (slab, frames, statistics)."""
    t0 = slab * job.slab_frames
    t1 = min(job.plan.frames, t0 + job.slab_frames)
    data = job.plan.read(t0, t1)
    stats = BlockStats.of(data)
    open_for_writing(job.store)[t0:t1] = data
    stats.save(resolve(job.progress) / f"{slab:08d}.npz")
    return slab, t1 - t0, stats


def resolve_chunks(chunks: tuple[int, int, int] | None, shape: tuple[int, ...]
                   ) -> tuple[int, ...]:
    """The chunk shape of a new store: ``chunks`` (default :data:`DEFAULT_CHUNKS`) with
    one plane per chunk along extra axes, clipped to the recording."""
    ct, cy, cx = chunks or DEFAULT_CHUNKS
    extra = (1,) * (len(shape) - 3)
    full = (ct, *extra, cy, cx)
    return tuple(max(1, min(c, s)) for c, s in zip(full, shape, strict=True))


#: Widest shard along y and x of ``shards="auto"``: larger frames get several shards per frame.
SHARD_WIDTH = 1024
#: ``shards="auto"`` keeps at least this many slabs (parallel tasks) in a short recording.
MIN_SLABS = 8


def resolve_shards(setting: tuple[int, int, int] | str, chunks: tuple[int, ...],
                   shape: tuple[int, ...], itemsize: int, zarr_format: int
                   ) -> tuple[int, ...] | None:
    """The shard shape of a new store, in whole chunks, or None for an unsharded one.

    ``auto`` gives shards of whole frames (up to :data:`SHARD_WIDTH` wide) holding about
    :data:`SHARD_BYTES` of samples, but never so many frames that a short recording has fewer
    than :data:`MIN_SLABS` slabs. It depends only on the recording's layout, so a resumed
    conversion finds the shards it started with.

    Raises
    ------
    ConfigError
        When a given shard shape is not a whole number of chunks.
    """
    if zarr_format == 2 or setting == "none":
        return None
    ceil_to = lambda n, c: -(-n // c) * c  # noqa: E731
    if isinstance(setting, tuple):
        full = (setting[0], *(1,) * (len(shape) - 3), setting[1], setting[2])
        shards = tuple(min(s, ceil_to(n, c)) for s, n, c in zip(full, shape, chunks,
                                                                  strict=True))
        for axis, s, c in zip("t" + "p" * (len(shape) - 3) + "yx", shards, chunks,
                              strict=True):
            if s % c:
                raise ConfigError(f"the shard size {s} along {axis} is not a multiple of the "
                                  f"chunk size {c}; shards hold whole chunks")
        return shards
    sy, sx = (min(ceil_to(n, c), c * max(1, SHARD_WIDTH // c))
              for n, c in zip(shape[-2:], chunks[-2:], strict=True))
    per_chunk_row = chunks[0] * sy * sx * itemsize
    rows = -(-shape[0] // chunks[0])
    k = max(1, min(SHARD_BYTES // per_chunk_row, rows // MIN_SLABS))
    return (chunks[0] * k, *chunks[1:-2], sy, sx)


def source_identity(part: Part) -> dict[str, Any]:
    """What identifies one source of a conversion: its file, series, size, modification time
    and the digest of its ends, and those of the files it links to (when it has any)."""
    entry: dict[str, Any] = {"path": part.path, "series": part.series, "size": part.size,
                             "mtime_ns": part.mtime_ns, "sample": part.sample}
    if part.linked:
        entry["linked"] = [{"path": name, "size": st.size, "mtime_ns": st.mtime_ns,
                            "sample": st.sample} for name, st in part.linked]
    return entry


def _identity(plan: SourcePlan, shape: tuple[int, ...], chunks: tuple[int, ...],
              shards: tuple[int, ...] | None, config: ConvertConfig) -> dict[str, Any]:
    return {
        "sources": [source_identity(s) for s in plan.sources],
        "shape": list(shape), "chunks": list(chunks),
        "shards": list(shards) if shards else None, "dtype": plan.first.dtype,
        "zarr_format": config.zarr_format, "compression": config.compression.model_dump(),
    }


def stale_sources(rec: Recording, plan: SourcePlan) -> str | None:
    """How the sources of a finished conversion differ from what it converted, in words
    (``rec.tif changed since (4096 → 8192 bytes)``), or None when they are the same files,
    unchanged (same size, modification time and sampled bytes, and the same for the files
    they link to).
    """
    stored = rec.stored
    then = stored.job.identity.get("sources") if stored.job.command == "convert" else None
    if then is None:  # written by follow, or before jobs were recorded: compare the files
        files = list(dict.fromkeys(s["path"] for s in stored.provenance.sources))
        return None if files == plan.paths else "it was converted from other files"
    now = [source_identity(s) for s in plan.sources]
    if [e["path"] for e in then] != [e["path"] for e in now]:
        return "it was converted from other files"
    for old, new in zip(then, now, strict=True):
        if old != new:
            return describe_change(old, new)
    return None


def scales(meta: PhysicalMetadata, frame_rate: float | None,
           pixel_size: float | None = None) -> dict[str, Any]:
    """The physical scales a recording store records, from its first file's metadata (a
    given frame rate or pixel size overrides the file's)."""
    interval = 1.0 / frame_rate if frame_rate else meta.frame_interval_s
    size = (pixel_size, pixel_size) if pixel_size else meta.pixel_size_um
    return {
        "frame_interval_s": interval,
        "frame_rate_hz": None if not interval else 1.0 / interval,
        "pixel_size_um": list(size) if size else None,
        "z_spacing_um": meta.z_spacing_um,
    }


def _ngff_scale(axes: tuple[str, ...], scales: dict[str, Any]
                ) -> tuple[list[float], dict[str, str | None]]:
    size = scales["pixel_size_um"]
    steps = {"t": scales["frame_interval_s"], "c": None, "z": scales["z_spacing_um"],
             "y": size[0] if size else None, "x": size[1] if size else None}
    return ([float(steps[a]) if steps[a] else 1.0 for a in axes],
            {a: AXIS_UNITS.get(a) if steps[a] else None for a in axes})


def convert(sources: str | Path | Sequence[str | Path], output: str | Path | RemotePath, *,
            config: ConvertConfig | None = None, cluster: str | Client | None = "local",
            workers: int | None = None, progress: bool | None = None) -> Recording:
    """Convert a recording into a chunked OME-Zarr store, out of core.

    Parameters
    ----------
    sources : source, glob, folder, or a sequence of them
        The file(s) of one recording, joined in natural sort order: TIFF, HDF5
        (``rec.h5[:/dataset]``), NWB (``rec.nwb[:Series]``, local or ``https://``), a Suite2p
        plane folder, or raw binary (with ``config.raw``).
    output : str or Path
        The OME-Zarr store to write (a directory, conventionally ``*.zarr``), or an fsspec
        URL (``s3://bucket/rec.zarr``).
    config : ConvertConfig, optional
        Chunking, format, compression, frame rate and overwrite options.
    cluster : str or Client, optional
        Where to run: ``"local"`` (default), a scheduler address, or a Client.
    workers : int, optional
        Worker processes of a local cluster.
    progress : bool, optional
        Show a progress bar; default: when standard error is a terminal.

    Returns
    -------
    Recording
        The finished store, opened for reading.

    Raises
    ------
    SourceError, OutputExistsError, StoreError, ConfigError
        On bad input; nothing complete-looking is left behind.
    """
    config = config or ConvertConfig()
    output = resolve(output)
    named = [sources] if isinstance(sources, (str, Path)) else list(sources)
    plan = open_sources(named, config.raw)
    files = [Path(p) for p in plan.files if not is_url(p)]
    # the folders named as sources are inputs too: the output may not lie inside them
    folders = [Path(s).expanduser() for s in named
               if not is_url(str(s)) and Path(s).expanduser().is_dir()]
    first = plan.first
    if plan.frames < 2:
        raise SourceError(f"{first.path} holds a single frame; a time-lapse recording needs "
                          "at least 2")
    shape = (plan.frames, *first.frame_shape)
    chunks = resolve_chunks(config.chunks, shape)
    shards = resolve_shards(config.shards, chunks, shape, np.dtype(first.dtype).itemsize,
                            config.zarr_format)
    slab_frames = (shards or chunks)[0]
    identity = _identity(plan, shape, chunks, shards, config)
    check_disjoint(output, [*files, *folders])  # before a cluster is started
    # Join or start the cluster before touching the output: a bad --cluster leaves nothing.
    with connect(cluster, workers=workers) as client, \
            open_store(output, command="convert", identity=identity,
                       inputs=[*files, *folders], overwrite=config.overwrite) as job:
        if job.resuming:
            _check_sources_since(client, job, plan, slab_frames)
        else:
            job.create(lambda: _create_store(output, plan, shape, chunks, shards, job, config))
            _save_states(job, plan)
        n_slabs = math.ceil(plan.frames / slab_frames)
        stats = BlockStats()
        done = set()
        for marker in job.progress.glob("*.npz"):
            stats.merge(BlockStats.load(marker))
            done.add(int(marker.stem))
        todo = [s for s in range(n_slabs) if s not in done]
        log.info("converting %d frames %s %s from %d file(s) into %s (chunks %s, %s): %d of "
                 "%d slabs to do", plan.frames, first.frame_shape, np.dtype(first.dtype),
                 len(plan.paths), output, chunks,
                 f"shards {shards}" if shards else "unsharded", len(todo), n_slabs)
        if todo:
            slab_job = _SlabJob(plan=plan, store=str(output), slab_frames=slab_frames,
                                progress=str(job.progress))
            with writing(output):
                _run_slabs(client, slab_job, todo, stats, progress)
        summary = stats.summary(np.dtype(first.dtype))
        if summary.get("nonfinite"):
            log.warning("%d samples are NaN or infinite: stored as they are, but training "
                        "and denoising refuse the recording until they are replaced",
                        summary["nonfinite"])
        job.finalise(statistics=summary)
    return open_recording(output)


def _save_states(job: StoreJob, plan: SourcePlan) -> None:
    """Record each source file's state (inode, status-change time) for a later resume."""
    states = {p: file_state(p) for p in plan.files if not is_url(p)}
    with writing(job.path):
        (job.progress / SOURCE_STATES).write_text(json.dumps(states))


def _check_sources_since(client: Client, job: StoreJob, plan: SourcePlan,
                         slab_frames: int) -> None:
    """Before resuming: every source file whose state changed since the conversion started
    (same size, times and sampled bytes, so the same identity, but written or replaced
    since) must still hold exactly the frames already converted from it.

    Raises
    ------
    SourceError
        Naming the file and the first frames that differ.
    """
    try:
        before = json.loads((job.progress / SOURCE_STATES).read_text())
    except (OSError, ValueError):
        before = {}
    changed = [p for p in plan.files if not is_url(p) and before.get(p) != file_state(p)]
    if not changed:
        return
    done = sorted(int(m.stem) for m in job.progress.glob("*.npz"))
    suspect = [s for s in done
               if any(set(part.files) & set(changed) for part in plan.parts_of(
                   s * slab_frames, min(plan.frames, (s + 1) * slab_frames)))]
    log.info("%s changed on disk since the conversion started; checking the %d slabs "
             "already converted from it against the file", Path(changed[0]).name, len(suspect))
    slab_job = _SlabJob(plan=plan, store=str(job.path), slab_frames=slab_frames,
                        progress=str(job.progress))
    for slab in run_pieces(client, _slab_differs, suspect, shared=slab_job):
        if slab is not None:
            t0 = slab * slab_frames
            t1 = min(plan.frames, t0 + slab_frames)
            raise SourceError(f"{changed[0]} changed since the unfinished conversion in "
                              f"{job.path} started (frames {t0}–{t1 - 1} differ from those "
                              "converted); pass --overwrite to convert it again from the start")
    _save_states(job, plan)


def _slab_differs(slab: int, job: _SlabJob) -> int | None:
    """``slab`` if the store's frames differ from the sources' now, else None."""
    t0 = slab * job.slab_frames
    t1 = min(job.plan.frames, t0 + job.slab_frames)
    stored = zarr.open_array(zarr_target(f"{job.store}/{ARRAY_PATH}", read_only=True),
                             mode="r")[t0:t1]
    source = job.plan.read(t0, t1)
    return None if stored.tobytes() == source.tobytes() else slab


def _create_store(output: StorePath, plan: SourcePlan, shape: tuple[int, ...],
                  chunks: tuple[int, ...], shards: tuple[int, ...] | None, job: StoreJob,
                  config: ConvertConfig) -> None:
    create_recording(output, first=plan.first, shape=shape, chunks=chunks, shards=shards,
                     job=job, config=config,
                     sources=[{"path": s.path, "bytes": s.size, "frames": s.frames,
                               "kind": s.kind} for s in plan.sources])


def create_recording(output: StorePath, *, first: Part, shape: tuple[int, ...],
                     chunks: tuple[int, ...], shards: tuple[int, ...] | None, job: StoreJob,
                     config: ConvertConfig, sources: list[dict[str, Any]]) -> None:
    """Create the (empty, unfinished) store of a recording whose first part is ``first``:
    what :func:`convert` writes, and ``follow`` while a recording is being acquired."""
    found = scales(first.metadata, config.frame_rate, config.pixel_size)
    scale, units = _ngff_scale(first.axes, found)
    attrs = {
        "format": 1, "kind": "recording", "complete": False,
        "job": job.job_attrs(),
        **found,
        "origin": first.metadata.origin,
        "provenance": {
            "tool": "deepcad-chunked", "version": __version__, "started": now(),
            "host": socket.gethostname(), "sources": sources,
        },
    }
    create_image(output, shape=shape, dtype=np.dtype(first.dtype), chunks=chunks,
                 axes=first.axes, scale=scale, units=units, zarr_format=config.zarr_format,
                 compression=config.compression, attrs=attrs,
                 shards=shards)


def _run_slabs(client: Client, job: _SlabJob, todo: list[int], stats: BlockStats,
               progress: bool | None) -> None:
    frame_bytes = math.prod(job.plan.first.frame_shape) * np.dtype(job.plan.first.dtype).itemsize
    total = job.plan.frames
    already = total - sum(min(total, (s + 1) * job.slab_frames) - s * job.slab_frames
                          for s in todo)
    bar = progress_bar(total, initial=already, unit="frame", desc="convert", progress=progress)
    try:
        for _, frames, slab_stats in run_pieces(client, _convert_slab, todo, shared=job):
            stats.merge(slab_stats)
            bar.update(frames)
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix_str(f"{rate * frame_bytes / 2**20:.0f} MiB/s", refresh=False)
    finally:
        bar.close()
