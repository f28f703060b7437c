"""Training-tile throughput from the Zarr store against the same sampling from memory, and
training memory for a short and an 8× longer recording.

Usage: python benchmarks/train_loader.py [--frames 2048] [--size 512] [--patch 32,64,64]
           [--chunks 32,128,128] [--compression zstd] [--batches 60] [--skip-rss]

Part 1: a synthetic recording is converted with the given chunks and compressor; the training
dataset then draws the same tiles (same seed, same indices) through a torch DataLoader (batch
4), and the batches are normalised and split into pairs as the training loop does, from (a)
the store with 1, 2 and 4 loader workers and (b) an in-memory numpy copy with 0, 1 and 2
workers. Reported: tile pairs per second and the ratio to in-memory with as many workers.

Part 2: ``deepcad-chunked train`` for a fixed number of steps on recordings of N and 8·N frames;
peak RSS of the whole process tree.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import machine, noisy_frames, run_measured
from torch.utils.data import DataLoader

from deepcad_chunked import CompressionConfig, ConvertConfig, convert
from deepcad_chunked.training.dataset import Normalization, TilePairDataset, make_pairs
from deepcad_chunked.training.tiles import split_regions


class InMemory(TilePairDataset):
    """The same dataset, reading tiles from a numpy array instead of the store."""

    def __init__(self, array: np.ndarray, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.memory = array

    def _array(self, recording: int) -> np.ndarray:
        return self.memory


def _rate(dataset: TilePairDataset, workers: int, batches: int, batch: int = 4) -> float:
    loader = DataLoader(dataset, batch_size=batch, sampler=range(batches * batch),
                        num_workers=workers, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first store open) is not what is measured
    t0 = time.perf_counter()
    n = 0
    for pairs in it:
        make_pairs(pairs, dataset.normalization)  # as the training loop does
        n += 1
    return n * batch / (time.perf_counter() - t0)


def _tiff(path: Path, frames: int, size: int) -> Path:
    pool = noisy_frames(256, size, size)
    tifffile.imwrite(path, (pool[t % 256] for t in range(frames)), shape=(frames, size, size),
                     dtype=np.uint16, photometric="minisblack", bigtiff=True)
    return path


def loader_rates(args: argparse.Namespace, work: Path) -> None:
    """Print part 1."""
    tif = _tiff(work / "rec.tif", args.frames, args.size)
    config = ConvertConfig(chunks=args.chunks,
                           compression=CompressionConfig(cname=args.compression))
    rec = convert(tif, work / "rec.zarr", config=config, workers=2, progress=False)
    pt, py, px = args.patch
    tile = (2 * pt, py, px)
    regions, _ = split_regions([rec.shape], tile, 0.05)
    norm = Normalization(rec.statistics["mean"], rec.statistics["std"])
    chunks = [(rec.chunks[0], rec.chunks[-2], rec.chunks[-1])]
    memory_array = np.asarray(rec.array[:])
    print(f"# recording {rec.shape} uint16, chunks {rec.chunks}, {args.compression}; "
          f"tiles {tile} (patch {args.patch}); batch 4; {args.batches} batches each\n")
    print("| tiles per window | loader workers | in-memory pairs/s | Zarr pairs/s | "
          "Zarr ÷ in-memory |")
    print("|---|---|---|---|---|")
    for per_window in args.tiles_per_window:
        kw = {"tiles_per_window": per_window, "chunks": chunks}
        from_store = TilePairDataset([rec.array_ref], regions, tile, 0, norm, **kw)
        memory = InMemory(memory_array, [str(rec.path)], regions, tile, 0, norm, **kw)
        for workers in (0, 1, 2, 4):
            mem = _rate(memory, workers, args.batches)
            store = _rate(from_store, workers, args.batches)
            print(f"| {per_window} | {workers} | {mem:.0f} | {store:.0f} | {store / mem:.2f} |",
                  flush=True)


def training_rss(args: argparse.Namespace, work: Path) -> None:
    """Print part 2."""
    print("\n| recording | frames | stored MiB | peak RSS MiB (train, 30 steps) |")
    print("|---|---|---|---|")
    peaks = []
    for factor in (1, 8):
        frames = args.rss_frames * factor
        tif = _tiff(work / f"r{factor}.tif", frames, 256)
        store = work / f"r{factor}.zarr"
        convert(tif, store, workers=2, progress=False)
        tif.unlink()
        cmd = [sys.executable, "-m", "deepcad_chunked.cli.main", "-q", "train", str(store),
               "-o", str(work / f"run{factor}"), "--patch", "16,64,64", "--features", "8",
               "--epochs", "1", "--steps-per-epoch", "30", "--workers", "2", "--device", "cpu",
               "--no-progress"]
        m = run_measured(cmd)
        stored = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20
        peaks.append(m.peak_rss_bytes)
        print(f"| {factor}× | {frames} | {stored:.0f} | {m.peak_rss_bytes / 2**20:.0f} "
              f"(exit {m.returncode}) |", flush=True)
    print(f"\npeak RSS ratio 8× / 1×: {peaks[1] / peaks[0]:.3f}")


def _triple(text: str) -> tuple[int, int, int]:
    a, b, c = (int(v) for v in text.split(","))
    return a, b, c


def main() -> None:
    """Run both parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--patch", type=_triple, default=(16, 64, 64))
    parser.add_argument("--chunks", type=_triple, default=None)
    parser.add_argument("--compression", default="zstd")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--tiles-per-window", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rss-frames", type=int, default=1000)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-rates", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# machine: {machine()}\n")
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        if not args.skip_rates:
            loader_rates(args, work)
        if not args.skip_rss:
            training_rss(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
