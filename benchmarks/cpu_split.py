"""Inference on the CPU: how to split the machine, and what the allocator costs.

One recording, one network, ``denoise`` (Zarr → Zarr, default blocks for each cluster) on
local clusters that split the machine's cores differently, side by side in one run:

- worker processes × ``torch`` threads each (one task thread per worker): every core in one
  process (a task may use all the memory: larger blocks) or one process per core;
- glibc's default allocator settings for workers, or those of inference workers
  (:data:`~deepcad_chunked.cluster.INFERENCE_MALLOC_ENV`: one arena, no mapping, no trimming).

Per run: the block chosen, its redundancy (network voxels ÷ output voxels), wall seconds of
the denoise (cluster start-up excluded; the workers have imported ``torch`` and loaded the
model), output voxels per second, and from the workers themselves their minor page faults,
system CPU seconds and peak RSS. All outputs are compared with the first (identical blocks
give identical results; other blocks agree to float rounding).

    python benchmarks/cpu_split.py [--frames 192] [--size 384] [--features 16] [--record]
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import machine, noisy_frames, publish

from deepcad_chunked import DenoiseConfig, convert, denoise
from deepcad_chunked.cluster import (
    INFERENCE_MALLOC_ENV,
    connect,
    cpu_cores,
    inference_workers,
)
from deepcad_chunked.infer.memory import network_voxels
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D


def _usage() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"minflt": own.ru_minflt, "sys": own.ru_stime, "maxrss": own.ru_maxrss * 1024}


def _one(store: Path, model: Path, out: Path, workers: int, keep_memory: bool
         ) -> dict[str, object]:
    workers, env = inference_workers(workers)
    if not keep_memory:  # the allocator settings of other local workers (connect's default)
        env = {k: v for k, v in env.items() if k not in INFERENCE_MALLOC_ENV}
    threads = env["OMP_NUM_THREADS"]
    with connect("local", workers=workers, worker_env=env) as client:
        client.run(lambda: __import__("torch").get_num_threads())  # workers import torch
        before = client.run(_usage)
        start = time.perf_counter()
        rec = denoise(store, model, out, cluster=client, progress=False,
                      config=DenoiseConfig())
        seconds = time.perf_counter() - start
        after = client.run(_usage)
    params = rec.attrs["parameters"]
    return {"workers": workers, "threads": threads, "seconds": seconds,
            "block": tuple(params["block"]), "halo": params["halo"],
            "minflt": sum(after[w]["minflt"] - before[w]["minflt"] for w in after),
            "sys": sum(after[w]["sys"] - before[w]["sys"] for w in after),
            "maxrss": max(after[w]["maxrss"] for w in after),
            "data": np.asarray(rec.to_dask())}


def main() -> None:
    """Run every split and print (or append) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=192)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    cores = cpu_cores()
    work = Path(tempfile.mkdtemp(prefix="bench-split-"))
    shape = (args.frames, args.size, args.size)
    lines = [f"{machine()}; recording {'×'.join(map(str, shape))} uint16, f = "
             f"{args.features}, default blocks, halo 48", "",
             "| workers × torch threads | allocator | block | redundancy | s | "
             "output Mvoxel/s | minor faults | system s | worker peak RSS GiB | "
             "max diff vs first |", "|---|---|---|---|---|---|---|---|---|---|"]
    try:
        pool = noisy_frames(64, args.size, args.size)
        raw = pool[np.arange(args.frames) % 64]
        tifffile.imwrite(work / "rec.tif", raw, photometric="minisblack")
        store = convert(work / "rec.tif", work / "rec.zarr", progress=False).path
        torch.manual_seed(0)
        model = Checkpoint(model_state=UNet3D(args.features).state_dict(),
                           features=args.features,
                           normalization={"mean": float(raw.mean()),
                                          "std": float(raw.std())}).save(work / "m.pt")
        first = None
        for workers in sorted({cores, 1}, reverse=True):
            for name, keep_memory in (("default", False), ("inference", True)):
                out = work / f"out-{workers}-{name}.zarr"
                r = _one(store, model, out, workers, keep_memory)
                first = r["data"] if first is None else first
                diff = int(np.abs(r["data"].astype(np.int64) - first).max())
                redundancy = network_voxels(shape, r["block"], r["halo"]) / math.prod(shape)
                lines.append(
                    f"| {workers} × {r['threads']} | {name} | "
                    f"{'×'.join(map(str, r['block']))} | {redundancy:.2f} | "
                    f"{r['seconds']:.1f} | {raw.size / r['seconds'] / 1e6:.2f} | "
                    f"{r['minflt'] / 1e6:.2f} M | {r['sys']:.1f} | {r['maxrss'] / 2**30:.1f} | "
                    f"{diff} |")
                print(lines[-1], flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish("Splitting the CPU for inference", "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
