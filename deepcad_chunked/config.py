"""Validated configuration objects of the package's jobs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deepcad_chunked.errors import ConfigError

#: The worker resource a forward pass holds on CPU inference workers (a GPU worker's is
#: ``GPU``): one pass at a time, while the worker's other threads read and write blocks.
FORWARD = "forward"
#: Task threads of a worker that runs the network: the passes run on one, holding the
#: worker's GPU or forward slot, while the other reads the next blocks and writes finished ones.
INFERENCE_THREADS = 2

#: Training's default kernel (t, y, x) of the network's learned linear bypass: it reaches
#: 6 half-rate frames and 3 px, far inside the U-Net's receptive radius, so halos stay exact.
BYPASS_KERNEL = (13, 7, 7)

#: Default storage chunk (t, y, x); see benchmarks/RESULTS.md, "Chunk shape".
DEFAULT_CHUNKS: tuple[int, int, int] = (32, 128, 128)
#: Raw bytes of one shard of a new Zarr v3 store (``shards="auto"``); see benchmarks/RESULTS.md,
#: "Sharding".
SHARD_BYTES: int = 64 * 2**20


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def build(cls, **values: object) -> _Config:
        """Validate ``values``, raising :class:`ConfigError` with a one-line message."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise ConfigError(f"invalid {where}: {msg}" if where else msg) from None


class RemoteConfig(_Config):
    """Bounds of every request to an object store (S3, GCS) or a web server.

    A store that stops answering ends a command in about ``attempts × read_timeout_s``
    (40 s by default) with one line, instead of waiting for ever. Set from the environment of
    the command and of its workers (:meth:`from_environment`):
    ``DEEPCAD_CHUNKED_CONNECT_TIMEOUT``, ``DEEPCAD_CHUNKED_READ_TIMEOUT`` (seconds) and
    ``DEEPCAD_CHUNKED_ATTEMPTS``.

    Attributes
    ----------
    connect_timeout_s : float
        Seconds to open a connection.
    read_timeout_s : float
        Seconds to wait for the next bytes of an answer.
    attempts : int
        Tries of one request (transient errors are retried, with backoff).
    """

    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(20.0, gt=0)
    attempts: int = Field(2, ge=1, le=20)

    #: The environment variable of each field.
    ENVIRONMENT: ClassVar[dict[str, str]] = {
        "connect_timeout_s": "DEEPCAD_CHUNKED_CONNECT_TIMEOUT",
        "read_timeout_s": "DEEPCAD_CHUNKED_READ_TIMEOUT",
        "attempts": "DEEPCAD_CHUNKED_ATTEMPTS"}

    @classmethod
    def from_environment(cls) -> RemoteConfig:
        """The bounds the environment sets (defaults where it sets none).

        Raises
        ------
        ConfigError
            Naming the variable whose value cannot work.
        """
        given = {f: os.environ[v] for f, v in cls.ENVIRONMENT.items() if os.environ.get(v)}
        try:
            return cls(**given)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = cls.ENVIRONMENT[str(first["loc"][0])]
            raise ConfigError(f"invalid {name}={given[str(first['loc'][0])]!r}: "
                              f"{first['msg'].removeprefix('Value error, ')}") from None

    def deadline_s(self, nbytes: int = 0) -> float:
        """Seconds one call moving ``nbytes`` may take, all its attempts included:
        ``attempts × (connect + read timeout)``, plus a second per MiB it sends."""
        return (self.attempts * (self.connect_timeout_s + self.read_timeout_s)
                + nbytes / 2**20)


class CompressionConfig(_Config):
    """Blosc settings of stored chunks (defaults chosen in benchmarks/RESULTS.md)."""

    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "zstd"
    clevel: int = Field(1, ge=0, le=9)
    shuffle: Literal["bitshuffle", "shuffle", "noshuffle"] = "bitshuffle"


class RawLayout(_Config):
    """How the samples of a headerless raw binary file are laid out.

    Attributes
    ----------
    shape : (t, y, x)
        Frames, height and width; ``t = -1`` takes as many frames as the file holds.
    dtype : str
        Sample type as numpy spells it (``uint16``, ``<i2``, ``>f4``); no byte order means the
        machine's.
    order : {"C", "F"}
        ``C``: frame after frame, rows of x (the usual); ``F``: Fortran order, t fastest.
    offset : int
        Bytes to skip at the start of the file (a header).
    """

    shape: tuple[int, int, int]
    dtype: str = "uint16"
    order: Literal["C", "F"] = "C"
    offset: int = Field(0, ge=0)

    @field_validator("shape")
    @classmethod
    def _sizes(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        t, y, x = value
        if y < 1 or x < 1 or (t < 1 and t != -1):
            raise ValueError(f"sizes must be positive (t may be -1: as many frames as the file "
                             f"holds), got {','.join(map(str, value))}")
        return value

    @field_validator("dtype")
    @classmethod
    def _numeric(cls, value: str) -> str:
        import numpy as np

        try:
            dtype = np.dtype(value)
        except TypeError:
            raise ValueError(f"{value!r} is not a numpy dtype") from None
        if dtype.kind not in "uif" or dtype.itemsize > 8:
            raise ValueError(f"{value!r} is not an integer or floating-point sample type")
        return value


class ConvertConfig(_Config):
    """Options of :func:`deepcad_chunked.convert`.

    Attributes
    ----------
    chunks : (t, y, x) or None
        Storage chunk shape; ``None`` picks :data:`DEFAULT_CHUNKS`, clipped to the recording.
    zarr_format : {2, 3}
        Zarr v3 with NGFF 0.5 (default) or Zarr v2 with NGFF 0.4.
    shards : (t, y, x), "auto" or "none"
        Zarr v3 shard shape, whole multiples of the chunks: each shard is one file holding
        many chunks. ``auto`` (default) picks shards of whole frames and about
        :data:`SHARD_BYTES`; ``none`` stores one file per chunk. Zarr v2 has no shards.
    frame_rate : float or None
        Frames per second, overriding the files' metadata.
    pixel_size : float or None
        Pixel size in micrometres, overriding the files' metadata.
    raw : RawLayout or None
        Read every source as headerless raw binary of this layout.
    compression : CompressionConfig
        Chunk compressor.
    overwrite : bool
        Replace an existing output store.
    """

    chunks: tuple[int, int, int] | None = None
    zarr_format: Literal[2, 3] = 3
    shards: tuple[int, int, int] | Literal["auto", "none"] = "auto"
    frame_rate: float | None = Field(None, gt=0)
    pixel_size: float | None = Field(None, gt=0)
    raw: RawLayout | None = None
    compression: CompressionConfig = CompressionConfig()
    overwrite: bool = False

    @field_validator("chunks")
    @classmethod
    def _positive_chunks(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"chunk sizes must be positive, got {value}")
        return value

    @field_validator("shards")
    @classmethod
    def _positive_shards(cls, value: tuple[int, int, int] | str) -> tuple[int, int, int] | str:
        if isinstance(value, tuple) and min(value) < 1:
            raise ValueError(f"shard sizes must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _shards_need_v3(self) -> ConvertConfig:
        if self.zarr_format == 2 and isinstance(self.shards, tuple):
            raise ValueError("Zarr v2 stores have no shards; drop the shard shape or use "
                             "Zarr v3")
        return self


def _multiple_of_8(value: tuple[int, int, int], what: str) -> tuple[int, int, int]:
    if min(value) < 8 or any(v % 8 for v in value):
        raise ValueError(f"{what} sizes must be positive multiples of 8, got {value}; "
                         f"e.g. {tuple(max(8, (v + 7) // 8 * 8) for v in value)}")
    return value


class TrainConfig(_Config):
    """Options of :func:`deepcad_chunked.train` (defaults: benchmarks/RESULTS.md, "Training").

    Attributes
    ----------
    patch : (pt, py, px)
        Input volume of one training sample; a tile reads ``2·pt`` frames. Multiples of 8.
    batch_size : int
        Tiles per optimiser step.
    epochs : int
        Epochs to train (a checkpoint and a validation loss after each).
    steps_per_epoch : int or None
        Optimiser steps per epoch; None: enough tiles to cover the training frames once.
    features : int
        Feature maps of the network's first level (16: DeepCAD-RT's network).
    lr : float
        Adam learning rate.
    betas : (float, float)
        Adam betas.
    workers : int
        DataLoader worker processes reading tiles (0: read in the training process).
    seed : int
        Seeds the weights and every tile drawn: a run is reproducible and resumable.
    device : {"auto", "cpu", "cuda"}
        ``auto`` uses CUDA when available.
    amp : bool
        Mixed precision (bfloat16 autocast) on CUDA; ignored on the CPU.
    val_fraction : float
        Fraction of each recording's last frames held out for validation (at least one tile).
    val_tiles : int
        Number of fixed validation tiles.
    tiles_per_window : int
        Consecutive samples cut from one chunk-aligned window of the store, which a loader
        worker reads once (1: every tile read on its own; see benchmarks/RESULTS.md).
    schedule : {"cosine", "constant"}
        Learning rate over the run: ``cosine`` rises linearly over the ``warmup`` fraction of
        the steps, then falls along a half cosine to nearly zero at the last step; ``constant``
        keeps ``lr`` throughout (DeepCAD-RT's).
    warmup : float
        Fraction of all steps spent rising to ``lr`` (``cosine`` only).
    average : float
        Decay of an exponential moving average of the weights, updated after every step
        (its decay ramps up over the first steps); checkpoints then hold the average, which
        inference uses. 0: off (the last weights, as DeepCAD-RT).
    loss : {"l1+l2", "l2"}
        Training loss: DeepCAD's mean of the L1 and L2 errors, or the L2 (mean squared)
        error alone, whose optimum is the mean of the target rather than something between
        its mean and median (closer to the truth under photon noise; benchmarks/RESULTS.md).
    bypass : (kt, ky, kx) or None
        Kernel of the network's learned linear bypass (a 3D filter of the input added to the
        U-Net's output, started as a Gaussian blur; odd sizes up to 31): a new network denoises
        like a Gaussian filter from its first step, and reaches a given quality in far fewer
        steps (benchmarks/RESULTS.md). None: DeepCAD-RT's network as published.
    calibrate : bool
        Fit the network's intensity calibration after every epoch and store it in the
        checkpoint (:mod:`deepcad_chunked.model.calibration`): denoised pixels keep their
        temporal mean in every intensity band. False: the network's output as it is.
    devices : int
        Processes training together, data-parallel (:mod:`deepcad_chunked.training.processes`):
        one per GPU (``cuda``: devices 0 … N−1 of this node) or on the CPU, each streaming its
        share of every batch of ``batch_size`` tiles (a multiple of ``devices``); the weights
        are those of one process with that batch, to float rounding.
    """

    patch: tuple[int, int, int] = (16, 64, 64)
    batch_size: int = Field(2, ge=1)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)
    features: int = Field(16, ge=1, le=128)
    lr: float = Field(3e-4, gt=0, lt=1)
    betas: tuple[float, float] = (0.5, 0.999)
    workers: int = Field(2, ge=0, le=64)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    val_tiles: int = Field(8, ge=1)
    tiles_per_window: int = Field(64, ge=1)
    schedule: Literal["cosine", "constant"] = "constant"
    warmup: float = Field(0.05, ge=0, lt=1)
    loss: Literal["l1+l2", "l2"] = "l1+l2"
    average: float = Field(0.0, ge=0, lt=1)
    bypass: tuple[int, int, int] | None = BYPASS_KERNEL
    calibrate: bool = True
    devices: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _batch_shared(self) -> TrainConfig:
        if self.batch_size % self.devices:
            raise ValueError(f"batch size {self.batch_size} cannot be shared by {self.devices} "
                             "devices: make it a multiple of --devices")
        return self

    @field_validator("patch")
    @classmethod
    def _patch_grid(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        return _multiple_of_8(value, "patch")

    @field_validator("bypass")
    @classmethod
    def _bypass_odd(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(k < 1 or k > 31 or k % 2 == 0 for k in value):
            raise ValueError(f"bypass kernel sizes must be odd, from 1 to 31, got {value}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {value}")
        return value

    @property
    def tile(self) -> tuple[int, int, int]:
        """Frames × rows × columns read for one sample: ``(2·pt, py, px)``."""
        pt, py, px = self.patch
        return (2 * pt, py, px)


class DenoiseConfig(_Config):
    """Options of :func:`deepcad_chunked.denoise`.

    Attributes
    ----------
    block : (t, y, x) or None
        Core block of one task, multiples of 8 (and by default of the storage chunks);
        None picks one from the device (see :func:`deepcad_chunked.jobs.denoise.plan_layout`).
    halo : int or None
        Overlap on every side of a block; None: the network's receptive radius rounded up to
        a multiple of 8 (exact).
    device : {"auto", "cpu", "cuda"}
        Where each worker runs the network; ``auto`` uses the worker's GPU when it has one.
    precision : {"fp32", "bf16", "fp16"}
        Arithmetic of the forward pass.
    dtype : {"same", "float32"}
        Output samples: the input's dtype (rounded, clipped to its range) or float32.
    tile_memory : int or None
        Bytes one forward pass may use; blocks that need more are cut into tiles inside
        their task. None: from each worker's GPU or memory limit.
    overwrite : bool
        Replace an existing output store.
    """

    block: tuple[int, int, int] | None = None
    halo: int | None = Field(None, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    dtype: Literal["same", "float32"] = "same"
    tile_memory: int | None = Field(None, gt=0)
    overwrite: bool = False

    @field_validator("block")
    @classmethod
    def _block_grid(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        return None if value is None else _multiple_of_8(value, "block")


class FollowConfig(_Config):
    """Options of :func:`deepcad_chunked.follow`.

    Attributes
    ----------
    pattern : str or None
        A glob on the names of the files to follow (``*_Ch1_*.tif``); default every TIFF.
    idle_timeout : float
        Seconds without a new frame after which the acquisition counts as over.
    block_frames : int
        Frames one task denoises while the denoising keeps up (a multiple of 8): the lag is
        at least this plus the halo.
    max_block_frames : int
        Frames one task may take when the denoising has fallen behind (a multiple of
        ``block_frames``): fewer halos per frame, so it catches up.
    recording : ConvertConfig
        Chunks, format, compression and frame rate of ``recording.zarr`` (as ``convert``).
    denoise : DenoiseConfig
        Halo, device, precision, output dtype and forward-pass memory (its ``block`` is
        not used: a task is whole frames).
    preview : Path or None
        A PNG kept showing the newest denoised frame beside its raw frame.
    overwrite : bool
        Replace the outputs of an earlier run.
    """

    pattern: str | None = None
    idle_timeout: float = Field(60.0, gt=0)
    block_frames: int = Field(16, ge=8)
    max_block_frames: int = Field(128, ge=8)
    recording: ConvertConfig = ConvertConfig()
    denoise: DenoiseConfig = DenoiseConfig()
    preview: Path | None = None
    overwrite: bool = False

    @model_validator(mode="after")
    def _blocks_on_the_grid(self) -> FollowConfig:
        if self.block_frames % 8:
            raise ValueError(f"block_frames must be a multiple of 8, got {self.block_frames}")
        if self.max_block_frames % self.block_frames:
            raise ValueError(f"max_block_frames ({self.max_block_frames}) must be a multiple "
                             f"of block_frames ({self.block_frames})")
        if self.denoise.block is not None:
            raise ValueError("follow denoises whole frames; set block_frames, not a block")
        return self


class SimulationConfig(_Config):
    """Options of :func:`deepcad_chunked.simulate`.

    Attributes
    ----------
    frames : int
        Frames to generate.
    size : (y, x)
        Frame size in pixels (1 µm per pixel).
    seed : int
        Seeds everything: the same seed gives the same files.
    photons : float
        Mean detected photons per pixel per frame of the clean recording (the photon level).
    frame_rate : float
        Frames per second (30 Hz, as the DeepCAD simulations).
    neurons : int or None
        Somata; None: one per 600 µm² of field.
    gain, offset, read_noise : float
        Detector: ADU per photon, baseline in ADU and the standard deviation of the Gaussian
        read noise in ADU.
    subtract_offset : bool
        Samples as many microscopes' software stores them: the baseline subtracted and
        negative values clipped to zero (dim pixels then hold many zeros, and their mean
        lies above the truth's); the clean recording's baseline is then 0.
    dropouts : float
        Probability that a line of a frame reads zeros (the scanner dropping a line).
    scene : {"somata", "dense"}
        ``somata``: separate round somata over smooth neuropil (the DeepCAD papers' recipe).
        ``dense``: twice as many somata, packed and irregular, thin active dendrites and
        axons, neuropil with a fine grain whose regions fluctuate on their own, slow
        bleaching and a small motion jitter of every frame.
    indicator : {"fast", "slow"}
        Calcium kinetics: GCaMP6f-like (rise 50 ms, decay 0.4–0.8 s) or GCaMP6s-like (rise
        150 ms, decay 1.2–2 s, larger transients).
    """

    frames: int = Field(3000, ge=1)
    size: tuple[int, int] = (256, 256)
    seed: int = Field(0, ge=0)
    photons: float = Field(2.0, gt=0, le=10_000)
    frame_rate: float = Field(30.0, gt=0)
    neurons: int | None = Field(None, ge=0)
    gain: float = Field(4.0, gt=0)
    offset: float = Field(100.0, ge=0)
    read_noise: float = Field(2.0, ge=0)
    subtract_offset: bool = False
    dropouts: float = Field(0.0, ge=0, lt=1)
    scene: Literal["somata", "dense"] = "somata"
    indicator: Literal["fast", "slow"] = "fast"

    @property
    def baseline(self) -> float:
        """The clean recording's value without any photons (ADU)."""
        return 0.0 if self.subtract_offset else self.offset

    @field_validator("size")
    @classmethod
    def _big_enough(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 16:
            raise ValueError(f"frames must be at least 16×16 pixels, got {value}")
        return value


class JobQueueOptions(_Config):
    """Options of a cluster on a batch system (``--cluster slurm|pbs|sge|lsf``).

    Unset options come from dask's configuration (``jobqueue.<kind>.*`` in
    ``~/.config/dask/jobqueue.yaml`` or ``config_file``).

    Attributes
    ----------
    jobs : int
        Most jobs at once (adaptive scaling goes up to this).
    min_jobs : int
        Jobs kept while the command runs, even when idle (at least one: they are submitted
        at the start, so that a refused job is reported at once).
    cores, memory : int, str
        Cores and memory of one job (e.g. ``"32GiB"``).
    gpus_per_job : int
        GPUs each job asks for; workers then advertise ``GPU`` resources.
    walltime, queue, account : str
        The batch system's walltime (``HH:MM:SS``), queue or partition, and account.
    config_file : Path or None
        A dask YAML file: its ``jobqueue.<kind>`` section configures this cluster, over the
        user's configuration; other sections are merged into dask's configuration.
    worker_wait : float
        Seconds to wait for the first worker (a job that pends longer fails the command
        with the job's state instead of hanging).
    """

    jobs: int = Field(4, ge=1, le=10_000)
    min_jobs: int = Field(1, ge=1)
    cores: int | None = Field(None, ge=1)
    memory: str | None = None
    gpus_per_job: int = Field(0, ge=0, le=64)
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    config_file: Path | None = None
    worker_wait: float = Field(900.0, gt=0)

    @field_validator("min_jobs")
    @classmethod
    def _not_above_jobs(cls, value: int, info: Any) -> int:
        jobs = info.data.get("jobs", 4)
        if value > jobs:
            raise ValueError(f"min_jobs {value} is more than jobs {jobs}")
        return value
