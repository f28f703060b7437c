"""Applying a trained network to arrays: monolithically in memory, or block by block with dask.

Both paths handle edges the same way: the recording is first extended at the end of each axis
to a multiple of 8 and then by ``halo`` voxels on both sides, each time by mirroring
(``numpy.pad(mode="symmetric")``, which is dask's ``boundary="reflect"``). The network is
translation-equivariant on the 8-voxel grid and its receptive field is finite, so with a halo
at least its receptive radius every block of :func:`denoise_dask` equals the same region of
:func:`predict_array` up to float rounding: no seams, and no darker or brighter edge frames.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch

from deepcad_chunked.errors import ConfigError
from deepcad_chunked.infer.lean import lean_forward
from deepcad_chunked.infer.memory import plan_tiles
from deepcad_chunked.model.calibration import output_calibration
from deepcad_chunked.model.checkpoint import Checkpoint
from deepcad_chunked.model.deepcad_rt import RECORDING_MEAN, resolve_normalization
from deepcad_chunked.model.unet3d import GRID, UNet3D, receptive_radius
from deepcad_chunked.store.location import file_state, resolve

log = logging.getLogger(__name__)


def default_halo() -> int:
    """The receptive radius rounded up to a multiple of 8: the smallest exact halo."""
    return math.ceil(receptive_radius() / GRID) * GRID


def check_halo(halo: int) -> int:
    """Validate a halo (a non-negative multiple of 8)."""
    if halo < 0 or halo % GRID:
        fit = max(0, math.ceil(halo / GRID) * GRID)
        raise ConfigError(f"halo {halo} must be a non-negative multiple of {GRID} "
                          f"(e.g. {fit}); {default_halo()} gives exact results")
    return halo


def grid_padding(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """End padding of ``(t, y, x)`` that makes each a multiple of 8."""
    return [(0, -n % GRID) for n in shape]


def _forward(model: torch.nn.Module, volume: np.ndarray, device: torch.device,
             precision: str) -> np.ndarray:
    """The network on one volume: the memory-lean forward pass
    (:func:`~deepcad_chunked.infer.lean.lean_forward`), channels-last on the CPU, where
    oneDNN then convolves without reordering every activation (benchmarks/RESULTS.md; the
    model is put in that layout once, by :func:`inference_layout`)."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        out = lean_forward(model, x) if isinstance(model, UNet3D) else model(x)
    return out[0, 0].float().cpu().numpy()


def inference_layout(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Put a network in the memory layout its inference runs fastest in (channels-last on the
    CPU); the same weights, so the same function. Done once per loaded model: never while
    another thread may be running it.

    On CUDA it also sets this process's cuDNN to autotune its convolutions (every block of a
    job has one of a few shapes) and to compute fp32 in fp32: cuDNN's default, TF32, rounds
    inputs to 10 bits of mantissa, and ``--precision fp32`` promises fp32's results
    (``benchmarks/gpu.py`` measures what TF32 would gain and cost).
    """
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last_3d)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return model


def predict_array(model: UNet3D, array: np.ndarray, *, halo: int | None = None,
                  device: str | torch.device = "cpu", precision: str = "fp32",
                  max_voxels: int | None = None) -> np.ndarray:
    """Denoise an in-memory ``(t, y, x)`` recording in one forward pass (or exact tiles).

    Parameters
    ----------
    model : UNet3D
        A network from :func:`~deepcad_chunked.load_model` (its ``normalization`` is applied).
    array : numpy.ndarray
        Raw samples, any real dtype, any size.
    halo : int, optional
        Mirrored margin added on every side; default :func:`default_halo`.
    device, precision
        Where and in which precision (``fp32``, ``bf16``, ``fp16``) to run.
    max_voxels : int, optional
        Largest network input of one forward pass; a larger recording is cut into tiles
        with their own halos (the same result). Default: one pass.

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``array``, in the units of the raw samples (through the
        model's intensity calibration when it has one: :mod:`deepcad_chunked.model.calibration`).
    """
    halo = default_halo() if halo is None else check_halo(halo)
    array = np.asarray(array)
    norm = model.normalization
    mean, std = resolve_normalization(
        norm, float(array.mean(dtype=np.float64)) if norm["mean"] == RECORDING_MEAN else None)
    mean, std = np.float32(mean), np.float32(std)
    x = (array.astype(np.float32) - mean) / std
    x = np.pad(x, grid_padding(x.shape), mode="symmetric")
    x = np.pad(x, halo, mode="symmetric")
    core = tuple(n - 2 * halo for n in x.shape)
    out = _forward_tiled(inference_layout(model, device), x, core, halo, max_voxels or x.size,
                         torch.device(device), precision)
    calibration = output_calibration(norm)
    if calibration is not None:
        out = calibration.apply(out)
    crop = tuple(slice(halo, halo + n) for n in array.shape)
    return out[crop] * std + mean


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, digest: str, device: str) -> UNet3D:
    """The network of a checkpoint, loaded once per worker process and device."""
    ckpt = Checkpoint.load(path)
    if digest and ckpt.digest != digest:
        raise ConfigError(f"model file {path} changed while the job was running")
    model = inference_layout(ckpt.build_model().to(device), device)
    model.normalization = dict(ckpt.normalization)
    return model


@functools.lru_cache(maxsize=4)
def _normalization_and_digest(path: str, version: str) -> tuple[dict[str, Any], str]:
    """Normalisation and weights digest of a checkpoint, read once per file version.

    A long recording is denoised a segment at a time, each segment's graph built by
    :func:`denoise_dask`; this keeps them from reading and hashing the file every time.
    """
    ckpt = Checkpoint.load(path)
    return dict(ckpt.normalization), ckpt.digest


def denoise_block(block: np.ndarray, *, model_path: str, digest: str, device: str,
                  precision: str, halo: int, max_voxels: int | None = None) -> np.ndarray:
    """Run the network on one normalised block with its halo (a map_overlap task).

    The network is loaded by path in the worker and cached by digest: it is never part of the
    task graph. A block whose forward pass needs more than ``max_voxels`` of input (or runs
    out of GPU memory) is cut into tiles on the 8-voxel grid, each with its own halo taken
    from the block, so the result is the same. Only the core (the block without its halo) of
    the returned array is meaningful: map_overlap trims the rest.
    """
    device = resolve_device(device)
    model = _cached_model(model_path, digest, device)
    core = tuple(n - 2 * halo for n in block.shape)
    limit = max_voxels or block.size
    calibration = output_calibration(model.normalization)
    while True:
        try:
            out = _forward_tiled(model, block, core, halo, limit, torch.device(device),
                                 precision)
            return out if calibration is None else calibration.apply(out)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            largest = max(math.prod(s.stop - s.start + 2 * halo for s in tile)
                          for tile in plan_tiles(core, halo, limit))
            limit = largest // 2
            log.warning("a block of %s voxels ran out of GPU memory; retrying in tiles of at "
                        "most %d voxels", block.shape, limit)


def _forward_tiled(model: UNet3D, block: np.ndarray, core: tuple[int, ...], halo: int,
                   max_voxels: int, device: torch.device, precision: str) -> np.ndarray:
    if block.size <= max_voxels:
        return _forward(model, block, device, precision)
    out = np.zeros(block.shape, dtype=np.float32)
    for tile in plan_tiles(core, halo, max_voxels):
        source = tuple(slice(s.start, s.stop + 2 * halo) for s in tile)
        inner = tuple(slice(halo, halo + s.stop - s.start) for s in tile)
        target = tuple(slice(s.start + halo, s.stop + halo) for s in tile)
        out[target] = _forward(model, block[source], device, precision)[inner]
    return out


def check_blocks(block: tuple[int, ...], halo: int, shape: tuple[int, ...]) -> None:
    """Refuse blocks and halos that cannot work, saying which would.

    Blocks must be positive multiples of 8, halos non-negative multiples of 8, and blocks at
    least the halo along every axis the recording spans more than one block of.
    """
    check_halo(halo)
    if any(b < GRID or b % GRID for b in block):
        fit = tuple(max(GRID, -(-b // GRID) * GRID) for b in block)
        raise ConfigError(f"block {tuple(block)} must be positive multiples of {GRID} "
                          f"(e.g. {fit})")
    for b, n in zip(block, shape, strict=True):
        if b < halo and n + (-n % GRID) > b:
            raise ConfigError(f"block {tuple(block)} is smaller than the halo ({halo}); use "
                              f"blocks of at least {halo} (e.g. {max(halo, 64)} per axis) or "
                              "a smaller halo")


def resolve_device(device: str) -> str:
    """``auto`` → this process's GPU when it has one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this worker has no CUDA device")
    return device


def mirror_indices(n: int, halo: int) -> np.ndarray:
    """Source index of every position of an axis of length ``n`` after both paddings.

    The same as ``np.pad(np.pad(a, (0, -n % 8), "symmetric"), halo, "symmetric")`` applied to
    ``a = arange(n)``, for any ``halo`` (also one longer than the axis).
    """
    first = np.pad(np.arange(n), (0, -n % GRID), mode="symmetric")
    return np.pad(first, halo, mode="symmetric")


def span_indices(frames: int, start: int, stop: int, halo: int) -> np.ndarray:
    """Recording frame of every input position of the span ``start:stop`` of a recording of
    ``frames`` frames: the span padded to the 8-frame grid, with ``halo`` frames either side,
    mirrored at the recording's start and end."""
    m = stop - start
    span = m + (-m % GRID) + 2 * halo
    return mirror_indices(frames, halo)[start:start + span]


def normalise(x: Any, mean: np.float32, std: np.float32) -> Any:
    """Raw samples (a numpy or dask array) as the network's float32 input."""
    return (x.astype(np.float32) - mean) / std


def denormalise(y: Any, mean: np.float32, std: np.float32) -> Any:
    """The network's output in raw units."""
    return y * std + mean


def _gather(x: Any, axis: int, idx: np.ndarray) -> Any:
    """``x`` indexed by ``idx`` along ``axis``, as slices of its runs of step +1 or -1.

    Mirror indices are a few such runs, so this is a handful of slices and one concatenation
    rather than a fancy-indexing graph.
    """
    parts, start = [], 0
    for end in range(1, len(idx) + 1):
        if end < len(idx) and end - start == 1 and abs(int(idx[end]) - int(idx[start])) == 1:
            continue
        step = int(idx[end - 1]) - int(idx[end - 2]) if end - start > 1 else 1
        if end < len(idx) and int(idx[end]) - int(idx[end - 1]) == step:
            continue
        lo, hi = int(idx[start]), int(idx[end - 1])
        where = [slice(None)] * x.ndim
        where[axis] = slice(lo, hi + 1) if step > 0 else slice(lo, hi - 1 if hi else None, -1)
        parts.append(x[tuple(where)])
        start = end
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=axis)


def block_chunks(n: int, block: int, halo: int) -> tuple[int, ...]:
    """Chunks of a padded axis so that each task's core is one block of the recording.

    The first chunk holds the left margin and the first block, the last the remainder and the
    right margin; every task then reads ``halo`` voxels of real context on both sides of its
    block, starting on the 8-voxel grid.
    """
    padded = n + (-n % GRID)
    cores = [block] * (padded // block) + ([padded % block] if padded % block else [])
    if len(cores) == 1:
        return (padded + 2 * halo,)
    return (halo + cores[0], *cores[1:-1], cores[-1] + halo)


def _fused(x: Any) -> Any:
    """``x`` with its graph optimised (reads, gathers and normalisation fused into few tasks)."""
    graph = da.optimization.optimize(x.__dask_graph__(), x.__dask_keys__())
    return da.Array(graph, x.name, x.chunks, meta=x._meta)


def denoise_dask(array: Any, model_path: str | Path, *, block: tuple[int, int, int],
                 halo: int | None = None, device: str = "cpu", precision: str = "fp32",
                 frames: tuple[int, int] | None = None,
                 max_voxels: int | None = None, recording_mean: float | None = None,
                 pinned: tuple[dict[str, Any], str] | None = None,
                 resources: dict[str, float] | None = None) -> Any:
    """The lazy graph of a chunked denoise of a ``(t, y, x)`` dask array.

    Parameters
    ----------
    array : dask.array.Array
        Raw samples.
    model_path : str or Path
        Checkpoint of the network (loaded by each worker, cached by digest).
    block : (t, y, x)
        Core block shape: multiples of 8, and at least ``halo`` along every axis the
        recording spans more than one block of.
    halo : int, optional
        Overlap on every side; default :func:`default_halo` (exact).
    device, precision
        Where and how each block runs.
    frames : (start, stop), optional
        Denoise only these frames (``start`` a multiple of ``block[0]``, ``stop`` one too or
        the end): the graph reads only them and their halo, so a long recording can be done
        a segment at a time with the same result.
    max_voxels : int, optional
        Largest network input of one forward pass; bigger blocks are tiled inside their task.
    recording_mean : float, optional
        Mean of the whole recording, for models that subtract it (DeepCAD-RT's); computed
        from ``array`` when such a model needs it and it is not given.
    pinned : (normalization, digest), optional
        The checkpoint's normalisation and weights digest, as the caller read them once:
        the file is then not read here, and every worker refuses a file with other weights.
    resources : dict, optional
        Worker resources each forward pass holds (``{"GPU": 1}``), and only the forward
        passes: the reads before them and whatever follows run beside them. They survive
        only a graph computed without optimisation (``optimize_graph=False``), which then
        keeps the forward passes apart from the rest.

    Returns
    -------
    dask.array.Array
        float32, ``array``'s shape (``stop - start`` frames), in raw units; equal to
        :func:`predict_array` to float rounding when ``halo >= receptive_radius()``.

    Raises
    ------
    ConfigError
        For blocks off the 8-grid or smaller than the halo.
    """
    halo = default_halo() if halo is None else halo
    check_blocks(block, halo, array.shape)
    n = array.shape[0]
    start, stop = frames or (0, n)
    if not (0 <= start < stop <= n and start % block[0] == 0
            and (stop == n or stop % block[0] == 0)):
        raise ConfigError(f"frames {start}:{stop} must lie in 0:{n} and start and end on "
                          f"blocks of {block[0]}")
    path = resolve(model_path)
    if pinned is None:
        try:
            version = json.dumps(file_state(path), sort_keys=True)
        except FileNotFoundError:
            version = ""
        pinned = _normalization_and_digest(str(path), version)
    norm, digest = pinned
    if norm["mean"] == RECORDING_MEAN and recording_mean is None:
        recording_mean = float(array.mean(dtype=np.float64).compute())
    mean, std = (np.float32(v) for v in resolve_normalization(norm, recording_mean))
    shape = (stop - start, *array.shape[1:])
    x = _gather(array, 0, span_indices(n, start, stop, halo))
    for axis in (1, 2):
        x = _gather(x, axis, mirror_indices(array.shape[axis], halo))
    x = normalise(x, mean, std)
    x = x.rechunk(tuple(block_chunks(m, b, halo) for m, b in zip(shape, block, strict=True)))
    x = _fused(x)
    fn = functools.partial(denoise_block, model_path=str(path), digest=digest, device=device,
                           precision=precision, halo=halo, max_voxels=max_voxels)
    # map_overlap in its three steps, so that only the forward passes carry ``resources``
    x = da.overlap.overlap(x, depth=halo, boundary="none", allow_rechunk=False)
    with dask.annotate(resources=resources) if resources else nullcontext():
        out = x.map_blocks(fn, dtype=np.float32, meta=np.empty((0, 0, 0), dtype=np.float32))
    out = da.overlap.trim_internal(out, {0: halo, 1: halo, 2: halo}, boundary="none")
    out = out[tuple(slice(halo, halo + m) for m in shape)]
    return denormalise(out, mean, std)
