"""Choosing the default storage chunk shape and compressor by measurement.

Usage: python benchmarks/chunks.py [--frames 1024] [--size 512] [--repeats 40]

Part 1, compressors: ratio and single-thread encode/decode speed of Blosc codecs on one
32×128×128 chunk of (a) the real two-photon recording in ../shared/data when present and (b)
synthetic photon-limited frames.

Part 2, chunk shapes: for each candidate, a Zarr store of the synthetic recording is written,
then read in the two ways the pipeline reads: random training tiles (2·pt × py × px at any
position) and inference blocks with halos (aligned to 64×256×256 cores, 48-voxel halo). Reported:
compression ratio, write time, read amplification (bytes decompressed ÷ bytes wanted) and warm
read throughput of what was wanted.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import tifffile
import zarr
from _common import machine, noisy_frames
from zarr.codecs import BloscCodec

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "mouse_2p_500x64x64.tif"
CODECS = [("zstd", 1, "bitshuffle"), ("zstd", 3, "bitshuffle"), ("zstd", 5, "bitshuffle"),
          ("zstd", 1, "shuffle"), ("lz4", 5, "bitshuffle"), ("lz4hc", 5, "bitshuffle"),
          ("blosclz", 5, "bitshuffle")]
SHAPES = [(1, 512, 512), (8, 256, 256), (16, 128, 128), (32, 128, 128), (32, 256, 256),
          (64, 64, 64), (64, 128, 128)]
TILES = {"train tile 64×64×64": (64, 64, 64), "train tile 128×128×128": (128, 128, 128)}
BLOCK, HALO = (64, 256, 256), 48


def compressors(repeats: int) -> None:
    """Print the compressor table."""
    synthetic = noisy_frames(32, 128, 128)
    samples = {"synthetic": synthetic}
    if REAL.exists():
        real = tifffile.imread(REAL)
        samples["real 2p (64² px)"] = np.ascontiguousarray(real[:256, :64, :64])
    numcodecs.blosc.use_threads = False
    shuffles = {"bitshuffle": 2, "shuffle": 1}
    print("| codec | " + " | ".join(f"ratio {k}" for k in samples) +
          " | encode MiB/s | decode MiB/s |")
    print("|---|" + "---|" * len(samples) + "---|---|")
    for cname, level, shuffle in CODECS:
        codec = numcodecs.Blosc(cname=cname, clevel=level, shuffle=shuffles[shuffle])
        ratios = [a.nbytes / len(codec.encode(a)) for a in samples.values()]
        enc = codec.encode(synthetic)
        t0 = time.perf_counter()
        for _ in range(repeats):
            codec.encode(synthetic)
        t1 = time.perf_counter()
        for _ in range(repeats):
            codec.decode(enc)
        t2 = time.perf_counter()
        mib = synthetic.nbytes * repeats / 2**20
        print(f"| {cname} {level} {shuffle} | " + " | ".join(f"{r:.2f}" for r in ratios) +
              f" | {mib / (t1 - t0):.0f} | {mib / (t2 - t1):.0f} |")


def _touched(start: tuple[int, ...], size: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    n = 1
    for s, w, c in zip(start, size, chunks, strict=True):
        n *= (s + w - 1) // c - s // c + 1
    return n


def chunk_shapes(frames: int, size: int, repeats: int, work: Path) -> None:
    """Print the chunk-shape table."""
    pool = noisy_frames(256, size, size)
    data = np.concatenate([pool] * math.ceil(frames / 256))[:frames]
    rng = np.random.default_rng(0)
    print("\n| chunks (t,y,x) | ratio | write s | " +
          " | ".join(f"{k}: amplification, MiB/s" for k in TILES) +
          " | inference block: amplification, MiB/s |")
    print("|---|---|---|" + "---|" * len(TILES) + "---|")
    for chunks in SHAPES:
        path = work / f"c{'x'.join(map(str, chunks))}.zarr"
        arr = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype,
                                compressors=BloscCodec(cname="zstd", clevel=1,
                                                       shuffle="bitshuffle"))
        t0 = time.perf_counter()
        arr[:] = data
        write_s = time.perf_counter() - t0
        stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        cells = []
        itemsize = data.dtype.itemsize
        chunk_bytes = math.prod(chunks) * itemsize
        for tile in TILES.values():
            wanted = touched = 0
            t0 = time.perf_counter()
            for _ in range(repeats):
                start = tuple(int(rng.integers(0, s - w + 1)) for s, w in zip(data.shape, tile,
                                                                                strict=True))
                arr[tuple(slice(s, s + w) for s, w in zip(start, tile, strict=True))]
                wanted += math.prod(tile) * itemsize
                touched += _touched(start, tile, chunks) * chunk_bytes
            seconds = time.perf_counter() - t0
            cells.append(f"{touched / wanted:.1f}, {wanted / 2**20 / seconds:.0f}")
        wanted = touched = 0
        t0 = time.perf_counter()
        for _ in range(max(4, repeats // 8)):
            core = [int(rng.integers(0, s // b)) * b for s, b in zip(data.shape, BLOCK,
                                                                     strict=True)]
            lo = [max(0, c - HALO) for c in core]
            hi = [min(s, c + b + HALO) for c, b, s in zip(core, BLOCK, data.shape, strict=True)]
            arr[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
            shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
            wanted += math.prod(shape) * itemsize
            touched += _touched(tuple(lo), shape, chunks) * chunk_bytes
        seconds = time.perf_counter() - t0
        cells.append(f"{touched / wanted:.1f}, {wanted / 2**20 / seconds:.0f}")
        print(f"| {chunks} | {data.nbytes / stored:.2f} | {write_s:.1f} | " + " | ".join(cells)
              + " |", flush=True)
        shutil.rmtree(path)


def main() -> None:
    """Run both parts and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    print(f"# machine: {machine()}\n")
    compressors(args.repeats)
    work = Path(tempfile.mkdtemp(prefix="bench-chunks-"))
    try:
        chunk_shapes(args.frames, args.size, args.repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
