"""How much of ``denoise`` is reading and writing, and what running them beside the network gains.

Usage: python benchmarks/overlap.py [--mib 64] [--size 256] [--features 4] [--block 64,256,256]
[--repeats 2] [--no-s3] [--record]

A TIFF of about MIB MiB (uint16 frames of SIZE²) is converted to a local store and to an
``s3://`` store on moto's S3 server on loopback (a slow store: one Python process answers
every request). Each store is then denoised, store to store, with a FEATURES-feature network
of random weights in blocks of BLOCK (the exact halo; ``--block default`` lets ``denoise``
choose), on one local inference worker set up two ways, alternated REPEATS times:

- **serial** (as before): one task thread, so a block's read, forward pass and write follow
  each other;
- **overlapped** (the default now): two threads and one forward slot, so the next blocks are
  read and finished ones written while a pass runs.

From dask's task stream of each run: the seconds of forward passes (``denoise_block`` tasks)
and of reads and writes (every other task), summed, and the span from the first task's start
to the last one's end. The target: an overlapped span within 10 % of max(passes, I/O) rather
than their sum, and no slower than serial on local disk. Every output is checked equal to the
first local serial one.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from _common import machine, publish, random_model, s3_bucket, s3_server, write_big_tiff
from distributed import get_task_stream

from deepcad_chunked import DenoiseConfig, denoise
from deepcad_chunked.cluster import INFERENCE_RESOURCES, connect, inference_workers
from deepcad_chunked.config import INFERENCE_THREADS

MODES = {"serial": (1, None), "overlapped": (INFERENCE_THREADS, INFERENCE_RESOURCES)}


def _run(store: str, model: Path, out: str, mode: str,
         block: tuple[int, int, int] | None) -> dict[str, float]:
    threads, resources = MODES[mode]
    workers, env = inference_workers(1)
    t0 = time.perf_counter()
    with connect("local", workers=workers, threads_per_worker=threads, worker_env=env,
                 resources=resources) as client, get_task_stream(client) as stream:
        denoise(store, model, out, config=DenoiseConfig(dtype="float32", block=block),
                cluster=client, progress=False)
    wall = time.perf_counter() - t0
    forward = io = 0.0
    first, last = float("inf"), 0.0
    for task in stream.data:
        key = task["key"][0] if isinstance(task["key"], tuple) else task["key"]
        for part in task["startstops"]:
            if part["action"] != "compute":
                continue
            took = part["stop"] - part["start"]
            if key.startswith("denoise_block"):
                forward += took
            else:
                io += took
            first, last = min(first, part["start"]), max(last, part["stop"])
    return {"wall": wall, "span": last - first, "forward": forward, "io": io}


def _array(path: str) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{path}/0", mode="r")[:])


def main() -> None:
    """Run the modes side by side and print one Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=64.0, help="size of the test TIFF")
    parser.add_argument("--size", type=int, default=256, help="frame edge in pixels")
    parser.add_argument("--features", type=int, default=4, help="feature maps of the network")
    parser.add_argument("--block", default="64,256,256", help="T,Y,X or default")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    block = None if args.block == "default" else tuple(int(v) for v in args.block.split(","))

    work = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    server = None
    stores = {"local disk": str(work / "rec.zarr")}
    try:
        frames = int(args.mib * 2**20 / (args.size * args.size * 2))
        tif = write_big_tiff(work / "rec.tif", frames, args.size, args.size)
        model = random_model(work / "m.pt", args.features)
        convert = [sys.executable, "-m", "deepcad_chunked.cli.main", "-q", "convert",
                   str(tif), "--no-progress", "-o"]
        subprocess.run([*convert, stores["local disk"]], check=True)
        if not args.no_s3:
            server, endpoint = s3_server()
            s3_bucket(endpoint)
            stores["loopback S3"] = "s3://bench/rec.zarr"
            subprocess.run([*convert, stores["loopback S3"]], check=True)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        reference: np.ndarray | None = None
        same = True
        for repeat in range(args.repeats):
            for where, store in stores.items():
                for mode in MODES:
                    out = (f"s3://bench/dn-{mode}-{repeat}.zarr" if store.startswith("s3://")
                           else str(work / f"dn-{mode}-{repeat}.zarr"))
                    results.setdefault((where, mode), []).append(
                        _run(store, model, out, mode, block))
                    got = _array(out)
                    if reference is None:
                        reference = got
                    same = same and bool(np.array_equal(got, reference))
                    print(where, mode, repeat, results[where, mode][-1], flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"machine: {machine()}; {frames} frames of {args.size}² uint16 "
             f"({frames * args.size**2 * 2 / 2**20:.0f} MiB raw), network f = {args.features} "
             f"(random weights), blocks {args.block} + halo 48, one local inference worker; "
             f"medians of {args.repeats} "
             "alternated runs; S3: moto's server on 127.0.0.1 (one Python process); outputs "
             f"all equal: {'yes' if same else 'NO'}", "",
             "| store | mode | wall s | task span s | forward passes s | reads and writes s | "
             "span ÷ max(passes, I/O) | span ÷ (passes + I/O) | wall ÷ serial |",
             "|---|---|---|---|---|---|---|---|---|"]
    for where in stores:
        serial = float(np.median([r["wall"] for r in results[where, "serial"]]))
        for mode in MODES:
            m: dict[str, Any] = {k: float(np.median([r[k] for r in results[where, mode]]))
                                 for k in ("wall", "span", "forward", "io")}
            lines.append(f"| {where} | {mode} | {m['wall']:.1f} | {m['span']:.1f} | "
                         f"{m['forward']:.1f} | {m['io']:.1f} | "
                         f"{m['span'] / max(m['forward'], m['io']):.2f} | "
                         f"{m['span'] / (m['forward'] + m['io']):.2f} | "
                         f"{m['wall'] / serial:.2f} |")
    publish("Reads and writes beside the forward passes", "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
