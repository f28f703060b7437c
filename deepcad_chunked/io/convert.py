"""Lossless, out-of-core, resumable conversion of TIFF archives into OME-Zarr.

The recording is cut into *slabs*: one storage chunk's worth of frames across the whole frame.
Each slab is one task on the dask cluster: it reads its frames from the TIFF file(s), writes
them to the store (whole chunks, so no two tasks touch one chunk), summarises them for the
whole-recording statistics and leaves a marker with that summary. A rerun after an interruption
skips slabs that have a marker; the statistics and completion flag are written last.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from deepcad_chunked._version import __version__
from deepcad_chunked.cluster import connect, results_as_completed
from deepcad_chunked.config import DEFAULT_CHUNKS, ConvertConfig
from deepcad_chunked.errors import SourceError
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
from deepcad_chunked.io.sources import discover_sources
from deepcad_chunked.io.stats import BlockStats
from deepcad_chunked.io.tiff import TiffSource, inspect_tiff, read_frames

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SourcePlan:
    """The files of one recording, in order, and where each starts on the time axis."""

    sources: tuple[TiffSource, ...]
    starts: tuple[int, ...]

    @property
    def frames(self) -> int:
        """Total number of time points."""
        return self.starts[-1] + self.sources[-1].frames

    @property
    def first(self) -> TiffSource:
        """The first file, whose layout every other file shares."""
        return self.sources[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of the recording, across file boundaries."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        if stop <= self.starts[k] + self.sources[k].frames:  # within one file: no copy
            return read_frames(self.sources[k], start - self.starts[k], stop - self.starts[k])
        out = np.empty((stop - start, *self.first.frame_shape), dtype=self.first.dtype)
        t = start
        while t < stop:
            src, s0 = self.sources[k], self.starts[k]
            n = min(stop, s0 + src.frames) - t
            out[t - start:t - start + n] = read_frames(src, t - s0, t - s0 + n)
            t += n
            k += 1
        return out


def plan_sources(paths: Sequence[Path]) -> SourcePlan:
    """Inspect every file and check that they form one recording.

    Parameters
    ----------
    paths : sequence of Path
        Files in recording order.

    Returns
    -------
    SourcePlan

    Raises
    ------
    SourceError
        When a file cannot be read or differs from the first in frame shape, axes or dtype.
    """
    sources = [inspect_tiff(p) for p in paths]
    first = sources[0]
    for src in sources[1:]:
        if src.frame_shape != first.frame_shape or src.axes != first.axes:
            raise SourceError(
                f"{Path(src.path).name} has frames of shape {src.frame_shape} (axes "
                f"{''.join(src.axes)}) but {Path(first.path).name} has {first.frame_shape} "
                f"(axes {''.join(first.axes)}); all files of a recording must match")
        if src.dtype != first.dtype:
            raise SourceError(f"{Path(src.path).name} holds {np.dtype(src.dtype)} samples but "
                              f"{Path(first.path).name} holds {np.dtype(first.dtype)}")
    starts = np.concatenate([[0], np.cumsum([s.frames for s in sources])[:-1]])
    return SourcePlan(tuple(sources), tuple(int(s) for s in starts))


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
    stats.save(Path(job.progress) / f"{slab:08d}.npz")
    return slab, t1 - t0, stats


def _resolve_chunks(chunks: tuple[int, int, int] | None, shape: tuple[int, ...]
                    ) -> tuple[int, ...]:
    ct, cy, cx = chunks or DEFAULT_CHUNKS
    extra = (1,) * (len(shape) - 3)
    full = (ct, *extra, cy, cx)
    return tuple(max(1, min(c, s)) for c, s in zip(full, shape, strict=True))


def _fingerprint(plan: SourcePlan, shape: tuple[int, ...], chunks: tuple[int, ...],
                 config: ConvertConfig) -> str:
    return fingerprint({
        "sources": [(s.path, s.size, s.mtime_ns) for s in plan.sources],
        "shape": shape, "chunks": chunks, "dtype": plan.first.dtype,
        "zarr_format": config.zarr_format, "compression": config.compression.model_dump(),
    })


def _scales(plan: SourcePlan, frame_rate: float | None) -> dict[str, Any]:
    meta = plan.first.metadata
    interval = 1.0 / frame_rate if frame_rate else meta.frame_interval_s
    return {
        "frame_interval_s": interval,
        "frame_rate_hz": None if not interval else 1.0 / interval,
        "pixel_size_um": list(meta.pixel_size_um) if meta.pixel_size_um else None,
        "z_spacing_um": meta.z_spacing_um,
    }


def _ngff_scale(axes: tuple[str, ...], scales: dict[str, Any]
                ) -> tuple[list[float], dict[str, str | None]]:
    size = scales["pixel_size_um"]
    steps = {"t": scales["frame_interval_s"], "c": None, "z": scales["z_spacing_um"],
             "y": size[0] if size else None, "x": size[1] if size else None}
    units = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}
    return ([float(steps[a]) if steps[a] else 1.0 for a in axes],
            {a: units.get(a) if steps[a] else None for a in axes})


def convert(sources: str | Path | Sequence[str | Path], output: str | Path, *,
            config: ConvertConfig | None = None, cluster: str | Client | None = "local",
            workers: int | None = None, progress: bool | None = None) -> Recording:
    """Convert a TIFF archive into a chunked OME-Zarr recording, out of core.

    Parameters
    ----------
    sources : path, glob, directory, or a sequence of them
        The TIFF file(s) of one recording, joined in natural sort order.
    output : str or Path
        The OME-Zarr store to write (a directory, conventionally ``*.zarr``).
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
    output = Path(output).expanduser().absolute()
    plan = plan_sources(discover_sources(sources))
    first = plan.first
    if plan.frames < 2:
        raise SourceError(f"{first.path} holds a single frame; a time-lapse recording needs "
                          "at least 2")
    shape = (plan.frames, *first.frame_shape)
    chunks = _resolve_chunks(config.chunks, shape)
    job_id = _fingerprint(plan, shape, chunks, config)
    markers = progress_dir(output, "convert")
    resume = can_resume(output, "convert", job_id, config.overwrite)
    # Join or start the cluster before touching the output: a bad --cluster leaves nothing.
    with connect(cluster, workers=workers) as client:
        if resume:
            log.info("resuming the unfinished conversion in %s", output)
            remove_partial_writes(output / ARRAY_PATH)
        else:
            _create_store(output, plan, shape, chunks, job_id, config)
            markers.mkdir(parents=True)
        n_slabs = math.ceil(plan.frames / chunks[0])
        stats = BlockStats()
        done = set()
        for marker in markers.glob("*.npz"):
            stats.merge(BlockStats.load(marker))
            done.add(int(marker.stem))
        todo = [s for s in range(n_slabs) if s not in done]
        log.info("converting %d frames %s %s from %d file(s) into %s (chunks %s): %d of %d "
                 "slabs to do", plan.frames, first.frame_shape, np.dtype(first.dtype),
                 len(plan.sources), output, chunks, len(todo), n_slabs)
        if todo:
            job = _SlabJob(plan=plan, store=str(output), slab_frames=chunks[0],
                           progress=str(markers))
            with writing(output):
                _run_slabs(client, job, todo, stats, progress)
    summary = stats.summary(np.dtype(first.dtype))
    if summary.get("nonfinite"):
        log.warning("%d samples are NaN or infinite: stored as they are, but training and "
                    "denoising refuse the recording until they are replaced",
                    summary["nonfinite"])
    attrs = read_group_attrs(output)[ATTRS_KEY]
    provenance = {**attrs["provenance"], "completed": now()}
    update_attrs(output, statistics=summary, provenance=provenance, complete=True)
    shutil.rmtree(output / PROGRESS_DIR, ignore_errors=True)
    return open_recording(output)


def _create_store(output: Path, plan: SourcePlan, shape: tuple[int, ...],
                  chunks: tuple[int, ...], job_id: str, config: ConvertConfig) -> None:
    prepare_output(output, config.overwrite)
    scales = _scales(plan, config.frame_rate)
    scale, units = _ngff_scale(plan.first.axes, scales)
    attrs = {
        "format": 1, "kind": "recording", "complete": False,
        "job": {"command": "convert", "fingerprint": job_id},
        **scales,
        "provenance": {
            "tool": "deepcad-chunked", "version": __version__, "started": now(),
            "host": socket.gethostname(),
            "sources": [{"path": s.path, "bytes": s.size, "frames": s.frames, "kind": s.kind}
                        for s in plan.sources],
        },
    }
    create_image(output, shape=shape, dtype=np.dtype(plan.first.dtype), chunks=chunks,
                 axes=plan.first.axes, scale=scale, units=units, zarr_format=config.zarr_format,
                 compression=Compression(**config.compression.model_dump()), attrs=attrs)


def _run_slabs(client: Client, job: _SlabJob, todo: list[int], stats: BlockStats,
               progress: bool | None) -> None:
    [job_future] = client.scatter([job], broadcast=True, hash=False)
    frame_bytes = math.prod(job.plan.first.frame_shape) * np.dtype(job.plan.first.dtype).itemsize
    futures = client.map(_convert_slab, todo, job=job_future, pure=False)
    total = job.plan.frames
    already = total - sum(min(total, (s + 1) * job.slab_frames) - s * job.slab_frames
                          for s in todo)
    bar = tqdm(total=total, initial=already, unit="frame", desc="convert",
               disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        for _, frames, slab_stats in results_as_completed(client, futures):
            stats.merge(slab_stats)
            bar.update(frames)
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix_str(f"{rate * frame_bytes / 2**20:.0f} MiB/s", refresh=False)
    finally:
        bar.close()
