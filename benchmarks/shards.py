"""Choosing the default shard shape by measurement: files, conversion, training and denoise reads.

Usage: python benchmarks/shards.py [--gib 1] [--size 512] [--shards none 32 64 128 256]
           [--dir DIR] [--record]

Writes a BigTIFF of about GIB GiB (uint16, one page per frame), then for each shard setting
(``none``: one file per 32×128×128 chunk; a number N: shards of N whole frames) converts it
with ``deepcad-chunked convert`` (page cache dropped first, ``sync`` included) and measures on
the result, side by side:

- files in the array and files per GB stored, and the time to list them and to delete them;
- conversion wall time ÷ ``cp`` + ``sync`` of the same TIFF;
- training tile pairs per second from the store (the training dataset, default patch and
  windows, 2 loader workers);
- denoise's reads: the whole recording read the way ``denoise`` reads it
  (``Recording.to_dask``: by shard where sharded), MB/s with the page cache dropped first;
  and the 224×256×256 blocks with their 48-voxel halo read one by one straight from Zarr
  (what a reader without shard-sized reads gets).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import zarr
from _common import drop_caches, machine, publish, run_measured, write_big_tiff
from train_loader import _rate

from deepcad_chunked import TrainConfig, open_recording
from deepcad_chunked.training.dataset import Normalization, TilePairDataset
from deepcad_chunked.training.tiles import split_regions

BLOCK, HALO = (224, 256, 256), 48


def _files(store: Path) -> list[Path]:
    return [p for p in (store / "0").rglob("*") if p.is_file()]


def _tile_rate(store: Path, batches: int) -> float:
    rec = open_recording(store)
    config = TrainConfig()
    pt, py, px = config.patch
    tile = (2 * pt, py, px)
    regions, _ = split_regions([rec.shape], tile, 0.05)
    dataset = TilePairDataset([rec.array_ref], regions, tile, 0,
                              Normalization(rec.statistics["mean"], rec.statistics["std"]),
                              tiles_per_window=config.tiles_per_window,
                              chunks=[(rec.chunks[0], rec.chunks[-2], rec.chunks[-1])])
    return _rate(dataset, 2, batches)


def _dask_read(store: Path) -> tuple[int, float]:
    """Bytes of the whole recording and seconds to read them as denoise does, cold."""
    drop_caches([store])
    rec = open_recording(store)
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=2):
        rec.to_dask().sum().compute()
    return rec.array.nbytes, time.perf_counter() - start


def _block_reads(store: Path) -> tuple[int, int, float]:
    """Blocks read, their bytes with the halos, and seconds to read them, cold."""
    drop_caches([store])
    array = zarr.open_array(str(store / "0"), mode="r")
    t, h, w = array.shape
    starts = [range(0, n, b) for n, b in zip((t, h, w), BLOCK, strict=True)]
    t0 = time.perf_counter()
    count = nbytes = 0
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                nbytes += array[max(0, a - HALO):a + BLOCK[0] + HALO,
                                max(0, b - HALO):b + BLOCK[1] + HALO,
                                max(0, c - HALO):c + BLOCK[2] + HALO].nbytes
                count += 1
    return count, nbytes, time.perf_counter() - t0


def main() -> None:
    """Convert with each shard setting and print one Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test TIFF")
    parser.add_argument("--size", type=int, default=512, help="frame edge in pixels")
    parser.add_argument("--shards", nargs="+", default=["none", "32", "64", "128", "256"])
    parser.add_argument("--batches", type=int, default=100, help="training batches of 4")
    parser.add_argument("--dir", type=Path, default=None, help="where to write")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.dir))
    frames = int(args.gib * 2**30 / (args.size * args.size * 2))
    tif = write_big_tiff(work / "rec.tif", frames, args.size, args.size)
    drop_caches([tif])
    cp = run_measured(["bash", "-c", f"cp '{tif}' '{work / 'copy.tif'}' && sync"]).seconds
    (work / "copy.tif").unlink()
    lines = [f"machine: {machine()}; {frames} frames of {args.size}² uint16 "
             f"({tif.stat().st_size / 2**30:.2f} GiB TIFF), chunks 32×128×128, zstd 1; "
             f"cp + sync {cp:.1f} s; blocks {BLOCK} with halo {HALO}", "",
             "| shards | files | files per GB | list s | convert s | ÷ cp | "
             "train pairs/s | denoise read MB/s (cold) | blocks/s, zarr (cold) | "
             "MB/s, zarr blocks (cold) | rm s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in args.shards:
        shard = "none" if setting == "none" else f"{setting},{args.size},{args.size}"
        store = work / "rec.zarr"
        drop_caches([tif])
        cmd = " ".join(f"'{c}'" for c in [sys.executable, "-m", "deepcad_chunked.cli.main",
                                          "-q", "convert", str(tif), "-o", str(store),
                                          "--shard", shard, "--no-progress"])
        conv = run_measured(["bash", "-c", cmd + " && sync"])
        if conv.returncode:
            raise SystemExit(f"convert --shard {shard} failed")
        t0 = time.perf_counter()
        files = _files(store)
        listed = time.perf_counter() - t0
        stored = sum(f.stat().st_size for f in files)
        rate = _tile_rate(store, args.batches)
        whole, read_s = _dask_read(store)
        count, halo_bytes, seconds = _block_reads(store)
        t0 = time.perf_counter()
        shutil.rmtree(store)
        removed = time.perf_counter() - t0
        lines.append(f"| {setting} | {len(files)} | {len(files) / (stored / 1e9):.0f} | "
                     f"{listed:.3f} | {conv.seconds:.1f} | {conv.seconds / cp:.2f} | "
                     f"{rate:.0f} | {whole / read_s / 1e6:.0f} | {count / seconds:.2f} | "
                     f"{halo_bytes / seconds / 1e6:.0f} | {removed:.3f} |")
        print(lines[-1], flush=True)
    shutil.rmtree(work)
    publish("Sharding", "\n".join(lines), args.record)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
