"""Denoising a recording store block by block on a dask cluster, into a new OME-Zarr store.

The graph is: Zarr → dask array → whole-recording normalisation → ``map_overlap`` of the
network (:func:`~deepcad_chunked.infer.predict.denoise_dask`) → de-normalisation → cast →
one write task per output block, each leaving a marker. Only blocks without a marker enter
the graph, so a rerun after a kill skips finished blocks; dask re-runs the tasks of a worker
that dies. Planes and channels are denoised as independent ``t, y, x`` series.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import product
from pathlib import Path
from typing import Any

import dask
import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from deepcad_chunked._version import __version__
from deepcad_chunked.cluster import connect, results_as_completed
from deepcad_chunked.config import DenoiseConfig
from deepcad_chunked.infer.predict import check_blocks, default_halo, denoise_dask
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
)
from deepcad_chunked.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

#: Default blocks (t, y, x) per device kind, before rounding up to the storage chunks.
#: With the default halo of 48 a long 512×512 recording is read 2.9× (GPU block) or 4.8× (CPU).
DEFAULT_BLOCKS = {"cpu": (64, 256, 256), "cuda": (192, 384, 384)}


def default_block(chunks: tuple[int, int, int], device: str, halo: int) -> tuple[int, ...]:
    """A block for ``device``: at least the halo, rounded up to whole storage chunks."""
    base = DEFAULT_BLOCKS["cuda" if device in ("cuda", "auto") and _gpu_here() else "cpu"]
    return tuple(math.ceil(max(b, halo) / c) * c if c % 8 == 0
                 else math.ceil(max(b, halo) / 8) * 8 for b, c in zip(base, chunks, strict=True))


def _gpu_here() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


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


def _regions(chunks: tuple[tuple[int, ...], ...]) -> Iterator[tuple[tuple[int, ...],
                                                                    tuple[slice, ...]]]:
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in chunks]
    for index in product(*(range(len(c)) for c in chunks)):
        yield index, tuple(slice(int(s[i]), int(s[i]) + c[i])
                           for s, c, i in zip(starts, chunks, index, strict=True))


def denoise(data: str | Path, model: str | Path, output: str | Path, *,
            config: DenoiseConfig | None = None, cluster: str | Client | None = "local",
            workers: int | None = None, progress: bool | None = None) -> Recording:
    """Denoise a recording with a trained network, block by block, into a new store.

    Parameters
    ----------
    data : str or Path
        A complete recording store.
    model : str or Path
        A checkpoint written by training.
    output : str or Path
        The OME-Zarr store to write (same axes, scales and chunks as the input).
    config : DenoiseConfig, optional
        Block, halo, device, precision, output dtype, overwrite.
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
    model_path = Path(model).expanduser().absolute()
    ckpt = Checkpoint.load(model_path)
    ckpt.build_model()  # refuses weights that do not fit their declared network
    output = Path(output).expanduser().absolute()
    chunks = (rec.chunks[0], rec.chunks[-2], rec.chunks[-1])
    halo = default_halo() if config.halo is None else config.halo
    block = config.block or default_block(chunks, config.device, halo)
    frames_yx = (rec.shape[0], rec.shape[-2], rec.shape[-1])
    check_blocks(block, halo, frames_yx)
    out_dtype = rec.dtype if config.dtype == "same" else np.dtype(np.float32)
    job_id = fingerprint({"input": str(rec.path.absolute()), "input_job": rec.attrs.get("job"),
                          "model": ckpt.digest, "block": block, "halo": halo,
                          "precision": config.precision, "dtype": out_dtype.str})
    markers = progress_dir(output, "denoise")
    resume = can_resume(output, "denoise", job_id, config.overwrite)
    with connect(cluster, workers=workers) as client:
        if resume:
            log.info("resuming the unfinished denoise in %s", output)
            remove_partial_writes(output / ARRAY_PATH)
        else:
            _create_output(output, rec, out_dtype, job_id, ckpt.digest, model_path, block, halo,
                           config)
            markers.mkdir(parents=True)
        tasks, total = _graph(rec, model_path, output, markers, block, halo, out_dtype, config,
                              client)
        log.info("denoising %s with %s (block %s, halo %d): %d of %d blocks to do", rec.path,
                 model_path.name, block, halo, len(tasks), total)
        if tasks:
            _run(client, tasks, total, progress)
    provenance = {**read_group_attrs(output)[ATTRS_KEY]["provenance"], "completed": now()}
    update_attrs(output, provenance=provenance, complete=True)
    shutil.rmtree(output / PROGRESS_DIR, ignore_errors=True)
    return open_recording(output)


def _create_output(output: Path, rec: Recording, dtype: np.dtype, job_id: str, digest: str,
                   model_path: Path, block: tuple[int, ...], halo: int,
                   config: DenoiseConfig) -> None:
    prepare_output(output, config.overwrite)
    scale = rec.ome["datasets"][0]["coordinateTransformations"][0]["scale"]
    units = {a["name"]: a.get("unit") for a in rec.ome["axes"]}
    keep = ("frame_interval_s", "frame_rate_hz", "pixel_size_um", "z_spacing_um")
    attrs = {
        "format": 1, "kind": "denoised", "complete": False,
        "job": {"command": "denoise", "fingerprint": job_id},
        **{k: rec.attrs.get(k) for k in keep},
        "model": {"path": str(model_path), "digest": digest},
        "parameters": {"block": list(block), "halo": halo, "precision": config.precision,
                       "dtype": dtype.name, "device": config.device},
        "provenance": {"tool": "deepcad-chunked", "version": __version__, "started": now(),
                       "host": socket.gethostname(), "input": str(rec.path.absolute())},
    }
    create_image(output, shape=rec.shape, dtype=dtype, chunks=rec.chunks, axes=rec.axes,
                 scale=scale, units=units, zarr_format=rec.zarr_format,
                 compression=Compression(), attrs=attrs)


def _graph(rec: Recording, model_path: Path, output: Path, markers: Path,
           block: tuple[int, ...], halo: int, dtype: np.dtype, config: DenoiseConfig,
           client: Client) -> tuple[list[Any], int]:
    """One delayed write per unfinished output block, across all planes."""
    gpu = any("GPU" in (w.get("resources") or {})
              for w in client.scheduler_info().get("workers", {}).values())
    source = rec.to_dask()
    storage = (rec.chunks[0], rec.chunks[-2], rec.chunks[-1])
    tasks, total = [], 0
    planes = list(product(*(range(n) for n in rec.shape[1:-2])))
    for plane in planes:
        series = source[(slice(None), *plane)]
        with dask.annotate(resources={"GPU": 1}) if gpu else nullcontext():
            out = denoise_dask(series, model_path, block=block, halo=halo,
                               device=config.device, precision=config.precision)
        out = _cast(out, dtype)
        if any(b % c for b, c in zip(block, storage, strict=True)):
            out = out.rechunk(storage)  # a user's block off the chunk grid: write whole chunks
        pieces = out.to_delayed()
        for index, region in _regions(out.chunks):
            total += 1
            name = "_".join(map(str, (*plane, *index)))
            marker = markers / f"{name}.done"
            if marker.exists():
                continue
            full = (region[0], *plane, *region[1:])
            tasks.append(dask.delayed(_write_block)(pieces[index], str(output), full,
                                                    str(marker), dask_key_name=f"write-{name}"))
    return tasks, total


def _run(client: Client, tasks: list[Any], total: int, progress: bool | None) -> None:
    futures = client.compute(tasks)
    bar = tqdm(total=total, initial=total - len(tasks), unit="block", desc="denoise",
               disable=None if progress is None else not progress, dynamic_ncols=True)
    try:
        for voxels in results_as_completed(client, futures):
            bar.update(1)
            rate = (bar.format_dict.get("rate") or 0.0) * voxels
            bar.set_postfix_str(f"{rate / 1e6:.1f} Mvoxel/s", refresh=False)
    finally:
        bar.close()
