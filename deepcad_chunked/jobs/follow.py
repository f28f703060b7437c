"""Denoising a recording while it is being acquired.

:func:`follow` watches a folder that acquisition software fills with TIFF files
(:mod:`deepcad_chunked.sources.growing`), appends each complete frame to ``OUTDIR/recording.zarr``
(the store ``convert`` would write of the same files) and denoises the recording a few frames
at a time into ``OUTDIR/denoised.zarr`` as soon as the frames a block's halo needs exist.

Exactness. A task denoises whole frames ``start:stop`` (``start`` on a block boundary) from
frames ``start - halo : stop + halo`` of the recording, mirrored at its start exactly as
:func:`~deepcad_chunked.infer.predict.denoise_dask` mirrors them. A task is only started once
``stop + halo`` frames exist, so it never needs the recording's end, and its result is the one
``denoise`` of the finished recording gives for those frames; the last blocks are done when
the acquisition ends, with the end mirrored. Tasks take ``block_frames`` frames while the
denoising keeps up (the least lag: a block plus the halo) and up to ``max_block_frames`` when
it has fallen behind (fewer halos per frame, so it catches up).

Both stores go through :mod:`deepcad_chunked.store.lifecycle` (locked, resumable, completion flag
last): an interrupted run resumes where it stopped when it is run again.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from distributed import Client, Future

from deepcad_chunked.cluster import connect, forward_resources, inference_workers
from deepcad_chunked.config import FollowConfig
from deepcad_chunked.errors import OutputExistsError, SourceError, StoreError
from deepcad_chunked.infer.predict import check_halo, default_halo
from deepcad_chunked.interrupt import check as check_interrupt
from deepcad_chunked.jobs.denoise import create_denoised, forward_budget, pin_model
from deepcad_chunked.jobs.follow_task import FollowTask, forward_span, read_span, write_span
from deepcad_chunked.jobs.ingest import Ingest
from deepcad_chunked.model.checkpoint import Checkpoint
from deepcad_chunked.model.deepcad_rt import RECORDING_MEAN, resolve_normalization
from deepcad_chunked.sources.growing import STOP_FILE
from deepcad_chunked.store.attributes import read_ours
from deepcad_chunked.store.integrity import open_array
from deepcad_chunked.store.lifecycle import LOCK_NAME, StoreJob, fingerprint, open_store, writing
from deepcad_chunked.store.location import local_folder, no_folder, resolve
from deepcad_chunked.store.lock import WriterLock
from deepcad_chunked.store.omezarr import ARRAY_PATH, update_attrs
from deepcad_chunked.store.pins import check_disjoint
from deepcad_chunked.store.recording import Recording, open_recording

log = logging.getLogger(__name__)

RECORDING = "recording.zarr"
DENOISED = "denoised.zarr"
#: Seconds between two looks at the folder.
POLL_S = 0.05
#: Seconds between two status lines.
STATUS_S = 5.0
#: Seconds between two redraws of the preview.
PREVIEW_S = 1.0


@dataclass(frozen=True)
class FollowResult:
    """What a :func:`follow` run produced.

    Attributes
    ----------
    recording, denoised : Recording
        The two finished stores.
    frames : int
        Frames acquired.
    lag_s : list of float
        For each block denoised in this run: seconds from the first sight of its last frame
        to its result being stored.
    """

    recording: Recording
    denoised: Recording
    frames: int
    lag_s: list[float]


def follow(source_dir: str | Path, model: str | Path, output_dir: str | Path, *,
           config: FollowConfig | None = None, cluster: str | Client | None = "local",
           workers: int | None = None,
           on_block: Callable[[int, int, float], None] | None = None,
           on_status: Callable[[int, int, float], None] | None = None) -> FollowResult:
    """Denoise a recording while it is being acquired, until it ends.

    Parameters
    ----------
    source_dir : str or Path
        The folder the acquisition writes TIFF files into (``file_00001.tif``, …; the newest
        may be growing page by page).
    model : str or Path
        A checkpoint (ours, or a DeepCAD-RT ``.pth``).
    output_dir : str or Path
        The folder of ``recording.zarr`` and ``denoised.zarr`` (created if needed).
    config : FollowConfig, optional
        File pattern, idle timeout, block sizes, store and denoising options, preview.
    cluster : str or Client, optional
        ``"local"`` (default), a scheduler address, or a Client.
    workers : int, optional
        Worker processes of a local cluster (default one, on every core).
    on_block : callable, optional
        Called as ``on_block(start, stop, stored_at)`` (``time.time()``) for each block stored.
    on_status : callable, optional
        Called as ``on_status(acquired, denoised, lag_s)`` after each block stored and at
        each status line: frames acquired so far, frames denoised from the first on without
        a gap, and seconds since the oldest frame not yet denoised was seen.

    Returns
    -------
    FollowResult
        The finished stores. The acquisition is over when no frame arrived for
        ``idle_timeout`` seconds or a file ``STOP`` appeared in ``source_dir``.

    Raises
    ------
    SourceError
        A file replaced, truncated, out of order or of another frame shape or type; no frame
        at all.
    OutputExistsError, LockedError, StoreError, ConfigError
        As ``convert`` and ``denoise``; nothing is marked complete.
    """
    config = config or FollowConfig()
    folder = local_folder(source_dir, "the folder follow watches")
    if not folder.is_dir():
        raise SourceError(f"{folder} is not a folder (follow watches the folder an "
                          "acquisition writes its TIFF files into)")
    outdir = local_folder(output_dir, "follow's output folder")
    model_path = resolve(model)
    check_disjoint(outdir, [folder, model_path])
    if outdir.exists() and not outdir.is_dir():
        raise OutputExistsError(f"output {outdir} exists and is not a folder")
    if not outdir.parent.is_dir():
        raise StoreError(f"cannot write {outdir}: {no_folder(outdir.parent)}")
    ckpt = Checkpoint.load(model_path)
    ckpt.build_model()  # refuses weights that do not fit their declared network
    halo = default_halo() if config.denoise.halo is None else check_halo(config.denoise.halo)
    env = None
    if cluster in (None, "local"):
        # unlike denoise, no forward slot on the CPU: passes of two spans at once keep the
        # lag lower there (benchmarks/RESULTS.md, "follow's spans in three tasks")
        workers, env = inference_workers(workers)
    rec_done = _finished(outdir, ckpt, halo, config, folder)  # before a cluster is started
    outdir.mkdir(exist_ok=True)
    with connect(cluster, workers=workers, worker_env=env) as client:
        run = _Run(client=client, folder=folder, outdir=outdir, ckpt=ckpt,
                   model_path=model_path, halo=halo, config=config, on_block=on_block,
                   on_status=on_status)
        return run.go(rec_done)


@dataclass
class _Run:
    """One follow run: its stores, its watch on the folder and its denoising tasks."""

    client: Client
    folder: Path
    outdir: Path
    ckpt: Checkpoint
    model_path: Any
    halo: int
    config: FollowConfig
    on_block: Callable[[int, int, float], None] | None
    on_status: Callable[[int, int, float], None] | None = None
    ingest: Ingest = field(init=False)
    den_job: StoreJob | None = None
    #: when each frame not yet denoised was first seen (time.time()), from frame ``seen_base``
    seen: deque[float] = field(default_factory=deque)
    seen_base: int = 0
    done_units: set[int] = field(default_factory=set)
    next_unit: int = 0
    running: dict[Future, tuple[int, int]] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    norm: tuple[float, float] | None = None
    slots: int = 1
    max_voxels: int = 0
    device: str = "cpu"
    pinned: str = ""
    last_status: float = 0.0
    last_preview: float = 0.0
    #: what each network pass holds on a worker (a GPU, a forward slot, or nothing)
    resources: dict[str, float] | None = None
    #: units denoised from the first on, without a gap
    contiguous: int = 0

    def __post_init__(self) -> None:
        self.ingest = Ingest(self.folder, self.rec_path, self.config)

    @property
    def rec_path(self) -> Path:
        return self.outdir / RECORDING

    @property
    def den_path(self) -> Path:
        return self.outdir / DENOISED

    # ----------------------------------------------------------------- the run
    def go(self, rec_done: bool) -> FollowResult:
        """Follow the acquisition to its end; only denoise when ``rec_done`` (this job's
        recording store is finished)."""
        rec_identity = _recording_identity(self.folder, self.config)
        den_identity = _denoised_identity(self.outdir, fingerprint(rec_identity), self.ckpt,
                                          self.halo, self.config)
        self._plan_tasks()
        with ExitStack() as stack:
            if rec_done:
                # held while it is read, so no other run replaces it meanwhile
                stack.enter_context(WriterLock.acquire(self.rec_path / LOCK_NAME,
                                                       output=self.rec_path,
                                                       command="follow"))
                self.ingest.done = True
                self.ingest.stored = open_recording(self.rec_path).shape[0]
                log.info("%s is complete; finishing %s", self.rec_path, self.den_path)
            else:
                self.ingest.job = stack.enter_context(open_store(
                    self.rec_path, command="follow", identity=rec_identity,
                    inputs=[self.folder, self.model_path], overwrite=self.config.overwrite))
                if self.ingest.job.resuming:
                    frames = self.ingest.resume()
                    self.seen.extend([time.time()] * frames)
                    log.info("resuming: %d frames of %s already in %s", frames, self.folder,
                             self.rec_path)
            self.den_job = stack.enter_context(open_store(
                self.den_path, command="follow", identity=den_identity,
                inputs=[self.rec_path, self.model_path], overwrite=self.config.overwrite))
            if self.den_job.resuming:
                self._resume_denoised()
            with writing(self.outdir):
                self._loop()
                self._submit(final=True)
                self._finish_tasks(wait=True)
                self._status(force=True)
                self.ingest.finalise()
                assert self.den_job is not None
                self.den_job.finalise()
        return FollowResult(recording=open_recording(self.rec_path),
                            denoised=open_recording(self.den_path),
                            frames=open_recording(self.rec_path).shape[0], lag_s=self.lags)

    def _plan_tasks(self) -> None:
        workers, self.device, self.max_voxels = forward_budget(
            self.client, self.ckpt.features, self.config.denoise)
        self.resources = forward_resources(self.client)
        # passes at once; with a GPU or forward slot per worker, as many spans again are read
        # or written beside them
        passes = sum(w["slots"] for w in workers.values()) or 1
        self.slots = passes * (2 if self.resources else 1)

    def _loop(self) -> None:
        ingest, watch = self.ingest, self.ingest.watch
        if not ingest.done:
            log.info("watching %s for %s; the acquisition ends after %g s without a new frame "
                     "or when a file %s appears there", self.folder,
                     self.config.pattern or "TIFF files", self.config.idle_timeout, STOP_FILE)
        last_frame = time.monotonic()
        while not ingest.done:
            check_interrupt()  # a stop asked from another thread (a GUI's Stop button)
            ended = (watch.stop_requested()
                     or time.monotonic() - last_frame > self.config.idle_timeout)
            frames = watch.poll(ended=ended)
            if frames is not None:
                last_frame = time.monotonic()
                ingest.take(frames)
                self.seen.extend([time.time()] * len(frames))
            if ended or ingest.due(self.halo):
                ingest.flush()
            if ended:
                if ingest.stored < 2:
                    raise SourceError(f"no recording arrived in {self.folder} ("
                                      f"{ingest.stored} frame(s) before the "
                                      + ("STOP file" if watch.stop_requested() else
                                         f"{self.config.idle_timeout:g} s idle timeout")
                                      + "); nothing was written")
                ingest.done = True
                log.info("the acquisition ended (%s) after %d frames; denoising the last "
                         "ones", "STOP" if watch.stop_requested() else "idle timeout",
                         ingest.stored)
                break
            self._finish_tasks(wait=False)
            self._submit(final=False)
            self._status()
            time.sleep(POLL_S)

    # ----------------------------------------------------------------- resume
    def _resume_denoised(self) -> None:
        assert self.den_job is not None
        self.done_units = {int(m.stem) for m in self.den_job.progress.glob("*.done")}
        ours = read_ours(self.den_path)
        norm = (ours.normalization if ours is not None else None) or {}
        if "mean" in norm:
            self.norm = (float(norm["mean"]), float(norm["std"]))
        self._advance()

    # ----------------------------------------------------------------- denoising
    def _ensure_denoised_store(self) -> None:
        assert self.den_job is not None
        if (self.den_path / ARRAY_PATH).exists():
            return
        rec = open_recording(self.rec_path, require_complete=False)
        d = self.config.denoise
        dtype = rec.dtype if d.dtype == "same" else np.dtype(np.float32)
        unit = self.config.block_frames
        job = self.den_job
        job.create(lambda: create_denoised(
            self.den_path, rec, shape=(0, *rec.shape[1:]), dtype=dtype,
            chunks=(unit, *rec.chunks[1:]),
            shards=(unit, *rec.shards[1:]) if rec.shards else None, store=job,
            model_path=self.model_path, digest=self.ckpt.digest,
            parameters={"block_frames": unit, "halo": self.halo, "precision": d.precision,
                        "dtype": dtype.name, "device": self.device},
            input=str(self.rec_path), while_acquired=True))

    def _normalisation(self, frames: int) -> tuple[float, float]:
        """The model's (mean, std); a DeepCAD-RT model's mean from the first block's frames,
        recorded in the denoised store's attributes."""
        if self.norm is None:
            recording_mean = None
            norm = dict(self.ckpt.normalization)
            if norm["mean"] == RECORDING_MEAN:
                count = min(frames, self.config.block_frames + self.halo)
                array = open_array(self.rec_path / ARRAY_PATH, strict=False)
                recording_mean = float(np.asarray(array[:count]).mean(dtype=np.float64))
                log.info("the model subtracts the recording's mean: using that of the first "
                         "%d frames, %.6g", count, recording_mean)
            mean, std = resolve_normalization(norm, recording_mean)
            update_attrs(self.den_path, normalization={
                "mean": mean, "std": std, "recording_mean": recording_mean,
                "frames": None if recording_mean is None else [0, count]})
            self.norm = (mean, std)
        return self.norm

    def _advance(self) -> None:
        while self.next_unit in self.done_units:
            self.next_unit += 1

    def _submit(self, final: bool) -> None:
        frames = self.ingest.stored
        unit = self.config.block_frames
        units = math.ceil(frames / unit) if final else (frames - self.halo) // unit
        per_task = self.config.max_block_frames // unit
        while self.next_unit < units and (final or len(self.running) < self.slots):
            first = self.next_unit
            last = first
            while (last + 1 < units and last + 1 - first < per_task
                   and last + 1 not in self.done_units):
                last += 1
            self._launch(first * unit, min(frames, (last + 1) * unit), frames)
            self.next_unit = last + 1
            self._advance()

    def _launch(self, start: int, stop: int, known: int) -> None:
        self._ensure_denoised_store()
        assert self.den_job is not None
        self.den_job.check()
        target = zarr.open_array(str(self.den_path / ARRAY_PATH), mode="r+")
        if target.shape[0] < stop:
            target.resize((stop, *target.shape[1:]))
        mean, std = self._normalisation(known)
        if not self.pinned:
            self.pinned = str(pin_model(self.den_job, self.ckpt))
        d = self.config.denoise
        dtype = np.dtype(target.dtype)
        task = FollowTask(recording=str(self.rec_path), denoised=str(self.den_path),
                     markers=str(self.den_job.progress), start=start, stop=stop, known=known,
                     unit=self.config.block_frames, halo=self.halo, model=self.pinned,
                     digest=self.ckpt.digest, mean=mean, std=std, device=d.device,
                     precision=d.precision, dtype=dtype.str, max_voxels=self.max_voxels,
                     preview=self.config.preview is not None)
        key = f"{start}-{stop}-{time.time_ns()}"
        raw = self.client.submit(read_span, task, pure=False, key=f"follow-read-{key}")
        core = self.client.submit(forward_span, task, raw, pure=False,
                                  resources=self.resources, key=f"follow-pass-{key}")
        future = self.client.submit(write_span, task, core, pure=False,
                                    key=f"follow-write-{key}")
        self.running[future] = (start, stop)

    def _finish_tasks(self, wait: bool) -> None:
        """Take the results of the finished tasks (all of them, with ``wait``)."""
        while self.running:
            finished = [f for f in self.running if f.done()]
            for future in finished:
                start, stop = self.running.pop(future)
                _, _, stored, last = future.result()
                self._stored(start, stop, stored, last)
            if not wait:
                return
            check_interrupt()
            if self.running:
                time.sleep(POLL_S)
                self._status()

    def _stored(self, start: int, stop: int, stored: float, last: Any) -> None:
        unit = self.config.block_frames
        self.done_units.update(range(start // unit, math.ceil(stop / unit)))
        index = stop - 1 - self.seen_base
        if 0 <= index < len(self.seen):
            self.lags.append(stored - self.seen[index])
        while self.seen and self.seen_base < self._contiguous_done():
            self.seen.popleft()
            self.seen_base += 1
        if self.on_block is not None:
            self.on_block(start, stop, stored)
        if self.on_status is not None:
            self.on_status(*self._progress())
        if last is not None and time.monotonic() - self.last_preview > PREVIEW_S:
            from deepcad_chunked.report import write_live_preview

            assert self.config.preview is not None
            write_live_preview(self.config.preview, *last, frame=stop - 1)
            self.last_preview = time.monotonic()

    def _contiguous_done(self) -> int:
        """Frames denoised from the first on, without a gap."""
        while self.contiguous in self.done_units:
            self.contiguous += 1
        return min(self.contiguous * self.config.block_frames, self.ingest.stored)

    def _progress(self) -> tuple[int, int, float]:
        """Frames acquired, frames denoised without a gap, seconds the oldest not yet
        denoised has waited."""
        acquired = self.ingest.stored + self.ingest.waiting
        done = self._contiguous_done()
        lag_s = (time.time() - self.seen[0]) if self.seen and acquired > done else 0.0
        return acquired, done, lag_s

    def _status(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_status < STATUS_S:
            return
        self.last_status = time.monotonic()
        acquired, done, lag_s = self._progress()
        if self.on_status is not None:
            self.on_status(acquired, done, lag_s)
        files = self.ingest.watch.files
        newest = files[-1].path.name if files else "no file yet"
        log.info("acquired %d frames (%s), denoised %d: lag %d frames, %.1f s", acquired,
                 newest, done, acquired - done, lag_s)


def _recording_identity(folder: Path, config: FollowConfig) -> dict[str, Any]:
    rec = config.recording
    return {"source": str(folder), "pattern": config.pattern,
            "chunks": list(rec.chunks) if rec.chunks else None,
            "shards": list(rec.shards) if isinstance(rec.shards, tuple) else rec.shards,
            "zarr_format": rec.zarr_format, "compression": rec.compression.model_dump(),
            "frame_rate": rec.frame_rate}


def _denoised_identity(outdir: Path, rec_fingerprint: str, ckpt: Checkpoint, halo: int,
                       config: FollowConfig) -> dict[str, Any]:
    d = config.denoise
    return {"input": str(outdir / RECORDING), "input_job": rec_fingerprint,
            "model": ckpt.digest, "block_frames": config.block_frames, "halo": halo,
            "precision": d.precision, "dtype": d.dtype}


def _finished(outdir: Path, ckpt: Checkpoint, halo: int, config: FollowConfig,
              folder: Path) -> bool:
    """Whether this job's ``recording.zarr`` is finished (only its denoising is left).

    Raises
    ------
    OutputExistsError
        When ``denoised.zarr`` is finished too (or alone), unless ``overwrite``.
    """
    rec_fp = fingerprint(_recording_identity(folder, config))
    rec_done = _finished_by(outdir / RECORDING, rec_fp)
    den_done = _finished_by(outdir / DENOISED,
                            fingerprint(_denoised_identity(outdir, rec_fp, ckpt, halo, config)))
    if config.overwrite:
        return False
    if rec_done and den_done:
        raise OutputExistsError(f"{outdir} already holds the finished {RECORDING} and "
                                f"{DENOISED}; pass --overwrite to start again")
    if den_done:
        raise OutputExistsError(f"{outdir / DENOISED} is complete but {RECORDING} is not; "
                                "pass --overwrite to start again")
    return rec_done


def _finished_by(path: Path, job_fingerprint: str) -> bool:
    """Whether ``path`` is a complete store written by the job of this fingerprint."""
    if not path.is_dir():
        return False
    ours = read_ours(path)
    return ours is not None and ours.complete and ours.job.fingerprint == job_fingerprint

