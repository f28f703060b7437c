"""``follow``'s first half: the frames of a folder that acquisition software is still writing,
appended to ``OUTDIR/recording.zarr`` as they arrive.

:class:`Ingest` reads new frames from the folder
(:class:`~deepcad_chunked.sources.growing.FolderWatch`), appends them a few at a time (each
append rewrites the newest chunks), keeps running statistics of whole chunk rows, and records
after each append what it has read, so that a killed run resumes where it stopped
(:meth:`Ingest.resume`) and refuses a folder that holds another recording now. The recording
store goes through :mod:`deepcad_chunked.store.lifecycle` like every output: locked,
completion flag last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import zarr

from deepcad_chunked.config import FollowConfig
from deepcad_chunked.errors import SourceError
from deepcad_chunked.jobs.convert import create_recording, resolve_chunks
from deepcad_chunked.sources.registry import watch_folder
from deepcad_chunked.store.lifecycle import StoreJob
from deepcad_chunked.store.location import write_atomic
from deepcad_chunked.store.omezarr import ARRAY_PATH, update_attrs
from deepcad_chunked.store.stats import BlockStats

#: New frames are appended to the store at least this many at a time (or after FLUSH_S, or
#: at once when they let another block be denoised): each append rewrites the newest chunks.
FLUSH_FRAMES = 8
FLUSH_S = 0.25
#: The job's record of what it has read, in the recording store's progress folder.
SOURCES = "sources.json"


class Ingest:
    """Frames read from ``folder`` and appended to the recording store at ``path``.

    Parameters
    ----------
    folder : Path
        The folder the acquisition writes into.
    path : Path
        The recording store.
    config : FollowConfig

    Attributes
    ----------
    watch : FolderWatch
        The reader of the folder.
    job : StoreJob or None
        The recording store's job; None once the store is finished (only denoising left).
    stored : int
        Frames appended to the store.
    done : bool
        Whether the acquisition has ended (every frame appended).
    """

    def __init__(self, folder: Path, path: Path, config: FollowConfig) -> None:
        self.folder, self.path, self.config = folder, path, config
        self.watch = watch_folder(folder, config.pattern)
        self.job: StoreJob | None = None
        self.stored = 0
        self.done = False
        self.pending: list[np.ndarray] = []
        self.since = 0.0
        #: frames appended whose chunk row is not yet summarised
        self.row: np.ndarray | None = None
        self.stats = BlockStats()
        #: frames summarised in ``stats`` (whole chunk rows)
        self.summarised = 0

    @property
    def waiting(self) -> int:
        """Frames read but not yet appended."""
        return sum(len(p) for p in self.pending)

    def due(self, halo: int) -> bool:
        """Whether the frames read should be appended now: enough of them, one waiting for
        long, or frames that let another block be denoised (no lag added)."""
        waiting = self.waiting
        if not waiting:
            return False
        unit = self.config.block_frames
        ready = (self.stored - halo) // unit
        return (waiting >= FLUSH_FRAMES or time.time() - self.since > FLUSH_S
                or (self.stored + waiting - halo) // unit > ready)

    def take(self, frames: np.ndarray) -> None:
        """Keep ``frames``, just read, until the next :meth:`flush`."""
        if not self.pending:
            self.since = time.time()
        self.pending.append(frames)

    def flush(self) -> None:
        """Append the frames read to the store (created with the first ones), then record
        what has been read."""
        if not self.waiting:
            return
        data = np.concatenate(self.pending)
        self.pending.clear()
        assert self.job is not None
        if not (self.path / ARRAY_PATH).exists():
            self._create(data)
        self.job.check()
        array = zarr.open_array(str(self.path / ARRAY_PATH), mode="r+")
        n = array.shape[0]
        array.resize((n + len(data), *array.shape[1:]))
        array.with_config({"write_empty_chunks": True})[n:n + len(data)] = data
        self.stored = n + len(data)
        self._summarise(data, array.chunks[0])
        write_atomic(self.job.progress / SOURCES, json.dumps(
            {"frames": n + len(data), "files": self.watch.state()}).encode())

    def _summarise(self, data: np.ndarray, row: int) -> None:
        """Keep statistics of whole chunk rows, saved with the number of frames they cover."""
        self.row = data if self.row is None else np.concatenate([self.row, data])
        saved = False
        while len(self.row) >= row:
            self.stats.merge(BlockStats.of(self.row[:row]))
            self.row = self.row[row:]
            self.summarised += row
            saved = True
        if saved and self.job is not None:
            self.stats.save(self.job.progress / f"stats_{self.summarised:012d}.npz")
            for old in self.job.progress.glob("stats_*.npz"):
                if old.name != f"stats_{self.summarised:012d}.npz":
                    old.unlink(missing_ok=True)

    def _create(self, first: np.ndarray) -> None:
        """Create the recording store, shaped like the first frames, with the first file's
        metadata."""
        head = self.watch.files[0].path
        source = self.watch.describe()
        if source is None:
            raise SourceError(f"{head} cannot be read as TIFF")
        if source.extra or source.strides["t"] != 1:
            raise SourceError(f"{head} holds {'×'.join(map(str, source.extra.values()))} "
                              f"{'/'.join(source.extra)} per time point; follow reads single-"
                              "channel, single-plane recordings (convert and denoise the "
                              "finished files instead)")
        # chunks as convert makes them; never sharded: the newest chunks are rewritten as
        # frames arrive while tasks read them, and a shard's index and chunks are read apart
        chunks = resolve_chunks(self.config.recording.chunks, (2**31, *first.shape[1:]))
        assert self.job is not None
        job = self.job
        job.create(lambda: create_recording(
            self.path, first=source, shape=(0, *first.shape[1:]), chunks=chunks,
            shards=None, job=job, config=self.config.recording,
            sources=[{"path": str(self.folder), "kind": "acquisition"}]))

    def resume(self) -> int:
        """Continue an interrupted run: the frames already in the store, checked against the
        folder, and their statistics. Returns how many frames the store holds.

        Raises
        ------
        SourceError
            When the folder holds another recording now.
        """
        assert self.job is not None
        try:
            state = json.loads((self.job.progress / SOURCES).read_text())
        except (OSError, ValueError):
            state = {"frames": 0, "files": []}
        array = zarr.open_array(str(self.path / ARRAY_PATH), mode="r+")
        frames = self.stored = int(state["frames"])
        if array.shape[0] != frames:  # killed between appending frames and recording them
            array.resize((frames, *array.shape[1:]))
        self.watch.restore(state["files"])
        if frames:
            for k in {0, frames - 1}:
                if not np.array_equal(self.watch.read_frame(k), array[k]):
                    raise SourceError(f"frame {k} in {self.folder} is not the one in "
                                      f"{self.path}: the folder holds another recording "
                                      "now; pass --overwrite to start again")
        kept = sorted(self.job.progress.glob("stats_*.npz"))
        usable = [p for p in kept if int(p.stem.split("_")[1]) <= frames]
        if usable:
            self.stats = BlockStats.load(usable[-1])
            self.summarised = int(usable[-1].stem.split("_")[1])
        rest = np.asarray(array[self.summarised:frames])
        self.row = rest if len(rest) else None
        return frames

    def finalise(self) -> None:
        """Finish the recording store: its statistics and the files it was read from, then
        the completion flag."""
        if self.job is None:
            return
        stats = self.stats
        if self.row is not None and len(self.row):
            stats.merge(BlockStats.of(self.row))
        array = zarr.open_array(str(self.path / ARRAY_PATH), mode="r")
        summary = stats.summary(np.dtype(array.dtype))
        provenance = {**(self.job.attrs.get("provenance") or {}),
                      "sources": [{"path": str(f.path), "frames": n}
                                  for f, n in zip(self.watch.files, self.watch.taken,
                                                  strict=True)]}
        update_attrs(self.path, provenance=provenance)
        self.job.finalise(statistics=summary)
