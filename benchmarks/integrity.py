"""What a store's self-verification costs: writing and reading with and without checksums.

Usage: python benchmarks/integrity.py [--mib 512] [--size 512] [--repeats 5] [--dir DIR]
           [--record]

Writes the same frames (photon-limited two-photon-like uint16, the default chunks, shards of
whole frames) into two Zarr v3 stores that differ only in the ``crc32c`` codec after Blosc,
then reads each back whole, the way ``export`` reads a store (a chunk row at a time, one read
ahead): once as a plain ``zarr.Array`` without checksums (today's reader before this change),
and through :class:`~deepcad_chunked.store.integrity.CheckedArray` with checksums (what every
command reads now: missing chunks refused, checksums verified). The variants alternate within
each repeat, so a noisy machine slows all of them alike; the median of the repeats is
reported, with the ratio to the plain store.

Then the same end to end, as users meet it: ``convert`` of a TIFF of the same frames and
``export`` of the store back to TIFF, through the library on a local dask cluster (threads in
this process), the stores written with and without the checksum codec, alternating.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr
from _common import machine, noisy_frames, publish
from distributed import Client, LocalCluster
from zarr.codecs import BloscCodec, Crc32cCodec

from deepcad_chunked import convert, export
from deepcad_chunked.config import DEFAULT_CHUNKS, ConvertConfig
from deepcad_chunked.store import omezarr
from deepcad_chunked.store.integrity import open_array
from deepcad_chunked.store.omezarr import read_slabs


def _write(path: Path, data: np.ndarray, checksums: bool) -> tuple[float, float]:
    shutil.rmtree(path, ignore_errors=True)
    blosc = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")
    chunks = tuple(min(c, s) for c, s in zip(DEFAULT_CHUNKS, data.shape, strict=True))
    array = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=chunks,
                              shards=(chunks[0] * 4, data.shape[1], data.shape[2]),
                              compressors=(blosc, Crc32cCodec()) if checksums else blosc,
                              fill_value=0, config={"write_empty_chunks": True})
    step = array.shards[0]
    start, cpu = time.perf_counter(), time.process_time()
    for t0 in range(0, data.shape[0], step):
        array[t0:t0 + step] = data[t0:t0 + step]
    return time.perf_counter() - start, time.process_time() - cpu


def _read(array: zarr.Array) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    total = 0
    for slab in read_slabs(array, array.chunks[0]):
        total += slab.shape[0]
    assert total == array.shape[0]
    return time.perf_counter() - start, time.process_time() - cpu


def _end_to_end(root: Path, data: np.ndarray, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``convert`` and ``export`` with and without checksums, alternating."""
    source = root / "rec.tif"
    tifffile.imwrite(source, data, bigtiff=True)
    times: dict[str, list[float]] = {k: [] for k in (
        "convert, no checksum", "convert, crc32c", "export, no checksum", "export, crc32c")}
    codecs = omezarr.stored_codecs
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        for _ in range(repeats):
            for checksums in (False, True):
                name = "crc32c" if checksums else "no checksum"
                store, out = root / f"{name}.zarr", root / f"{name}.tif"
                omezarr.stored_codecs = functools.partial(codecs, checksums=checksums)
                try:
                    start = time.perf_counter()
                    convert(source, store, config=ConvertConfig(overwrite=True),
                            cluster=client, progress=False)
                    times[f"convert, {name}"].append(time.perf_counter() - start)
                finally:
                    omezarr.stored_codecs = codecs
                start = time.perf_counter()
                export(store, out, overwrite=True, progress=False)
                times[f"export, {name}"].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="raw size of the recording")
    parser.add_argument("--size", type=int, default=512, help="frame height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()

    frames = args.mib * 2**20 // (2 * args.size**2)
    pool = noisy_frames(64, args.size, args.size)
    data = pool[np.arange(frames) % len(pool)]
    root = Path(tempfile.mkdtemp(dir=args.dir))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in (
        "write, no checksum", "write, crc32c", "read, plain zarr, no checksum",
        "read, checked, crc32c")}
    try:
        for _ in range(args.repeats):
            times["write, no checksum"].append(_write(root / "plain.zarr", data, False))
            times["write, crc32c"].append(_write(root / "crc.zarr", data, True))
            plain = zarr.open_array(str(root / "plain.zarr"), mode="r")
            checked = open_array(root / "crc.zarr", strict=True)
            times["read, plain zarr, no checksum"].append(_read(plain))
            times["read, checked, crc32c"].append(_read(checked))
        sizes = {name: sum(p.stat().st_size for p in (root / name).rglob("*") if p.is_file())
                 for name in ("plain.zarr", "crc.zarr") if (root / name).exists()}
        whole = _end_to_end(root, data, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = data.nbytes / 2**20
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    lines = [f"{machine()}; {frames} frames of {args.size}² uint16 ({mib:.0f} MiB), chunks "
             f"{DEFAULT_CHUNKS}, shards of 4 chunk rows, in {args.dir or 'a temporary folder'};"
             f" median of {args.repeats} alternating repeats, page cache warm. CPU s: the "
             "process's CPU time, all threads (what the checksums cost, whatever else the "
             "machine does)",
             "",
             "| | wall s | MiB/s | wall vs without | CPU s | CPU vs without |",
             "|---|---:|---:|---:|---:|---:|"]
    for key in wall:
        base = "write, no checksum" if key.startswith("write") else \
            "read, plain zarr, no checksum"
        lines.append(f"| {key} | {wall[key]:.3f} | {mib / wall[key]:.0f} | "
                     f"{wall[key] / wall[base]:.3f} | {cpu[key]:.3f} | "
                     f"{cpu[key] / cpu[base]:.3f} |")
    if len(sizes) == 2:
        lines += ["", f"stored bytes: {sizes['crc.zarr'] / sizes['plain.zarr']:.5f}× "
                      "(4 bytes per chunk)"]
    lines += ["", "End to end (TIFF → `convert` → store → `export` → TIFF, a local cluster of "
              "2 threads):", "", "| | median s | MiB/s | vs without |", "|---|---:|---:|---:|"]
    e2e = {k: statistics.median(v) for k, v in whole.items()}
    for key, value in e2e.items():
        base = e2e[key.split(",")[0] + ", no checksum"]
        lines.append(f"| {key} | {value:.3f} | {mib / value:.0f} | {value / base:.3f} |")
    publish("Checksums: writing and reading a store with and without them", "\n".join(lines),
            args.record)


if __name__ == "__main__":
    main()
