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
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepcad_chunked.errors import ConfigError
from deepcad_chunked.model.checkpoint import Checkpoint
from deepcad_chunked.model.unet3d import GRID, UNet3D


@functools.lru_cache(maxsize=8)
def receptive_radius(levels_probe: int = 1) -> int:
    """How far (in voxels, along any axis) an output voxel sees into its input.

    Measured once on the architecture: the gradient of one output voxel of a network with
    positive weights spreads over exactly its receptive field.
    """
    torch.manual_seed(0)
    model = UNet3D(features=levels_probe).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) * 0.1 + 0.01)
    n = 192
    x = torch.ones(1, 1, n, 8, 8, dtype=torch.float64, requires_grad=True)
    out = model(x)
    out[0, 0, n // 2, 4, 4].backward()
    reach = torch.nonzero(x.grad[0, 0, :, 4, 4].abs() > 0).flatten()
    return int(max(n // 2 - reach.min().item(), reach.max().item() - n // 2))


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
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        out = model(x)
    return out[0, 0].float().cpu().numpy()


def predict_array(model: UNet3D, array: np.ndarray, *, halo: int | None = None,
                  device: str | torch.device = "cpu", precision: str = "fp32") -> np.ndarray:
    """Denoise an in-memory ``(t, y, x)`` recording in one forward pass.

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

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``array``, in the units of the raw samples.
    """
    halo = default_halo() if halo is None else check_halo(halo)
    norm = model.normalization
    x = (np.asarray(array, dtype=np.float32) - np.float32(norm["mean"])) / np.float32(norm["std"])
    x = np.pad(x, grid_padding(x.shape), mode="symmetric")
    x = np.pad(x, halo, mode="symmetric")
    out = _forward(model, x, torch.device(device), precision)
    crop = tuple(slice(halo, halo + n) for n in array.shape)
    return out[crop] * np.float32(norm["std"]) + np.float32(norm["mean"])


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, digest: str, device: str) -> UNet3D:
    """The network of a checkpoint, loaded once per worker process and device."""
    ckpt = Checkpoint.load(path)
    if digest and ckpt.digest != digest:
        raise ConfigError(f"model file {path} changed while the job was running")
    model = ckpt.build_model().to(device)
    model.normalization = dict(ckpt.normalization)
    return model


def denoise_block(block: np.ndarray, *, model_path: str, digest: str, device: str,
                  precision: str) -> np.ndarray:
    """Run the network on one normalised block with its halo (a map_overlap task).

    The network is loaded by path in the worker and cached by digest: it is never part of the
    task graph.
    """
    device = resolve_device(device)
    model = _cached_model(model_path, digest, device)
    return _forward(model, block, torch.device(device), precision)


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


def _mirror_pad(x: Any, axis: int, halo: int) -> Any:
    import dask.array as da

    n = x.shape[axis]
    idx = mirror_indices(n, halo)
    parts = [da.take(x, idx[:halo], axis=axis), x, da.take(x, idx[halo + n:], axis=axis)]
    return da.concatenate([p for p in parts if p.shape[axis]], axis=axis)


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


def denoise_dask(array: Any, model_path: str | Path, *, block: tuple[int, int, int],
                 halo: int | None = None, device: str = "cpu",
                 precision: str = "fp32") -> Any:
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

    Returns
    -------
    dask.array.Array
        float32, the shape of ``array``, in raw units; equal to :func:`predict_array` to
        float rounding when ``halo >= receptive_radius()``.

    Raises
    ------
    ConfigError
        For blocks off the 8-grid or smaller than the halo.
    """
    halo = default_halo() if halo is None else halo
    check_blocks(block, halo, array.shape)
    ckpt = Checkpoint.load(model_path)
    mean, std = np.float32(ckpt.normalization["mean"]), np.float32(ckpt.normalization["std"])
    x = (array.astype(np.float32) - mean) / std
    for axis in range(3):
        x = _mirror_pad(x, axis, halo)
    x = x.rechunk(tuple(block_chunks(n, b, halo) for n, b in zip(array.shape, block,
                                                                  strict=True)))
    fn = functools.partial(denoise_block, model_path=str(Path(model_path).absolute()),
                           digest=ckpt.digest, device=device, precision=precision)
    out = x.map_overlap(fn, depth=halo, boundary="none", trim=True, dtype=np.float32,
                        meta=np.empty((0, 0, 0), dtype=np.float32), allow_rechunk=False)
    out = out[tuple(slice(halo, halo + n) for n in array.shape)]
    return out * std + mean
