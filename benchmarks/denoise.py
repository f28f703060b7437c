"""Chunked denoising: redundancy, seam error, overhead over bare forward passes, and memory.

Usage: python benchmarks/denoise.py [--frames 128] [--size 192] [--features 16] [--skip-rss]

Part 1, on one synthetic recording and one f = 16 network (random weights; the geometry, not
the training, decides seams and redundancy), side by side: (a) our default halo (48), (b) a
fast setting with a 16-voxel halo, both with 64×96×96 blocks so that the recording is cut in
many places, and (c) DeepCAD-RT's scheme re-implemented from its description: 144³ tiles (150
on the 8-grid), stride 72 (overlap 0.5), the central part of each tile kept, each output tile
rescaled by √(Σraw/Σout). Seam error = max |x − predict_array| ÷ the data range, measured;
redundancy = voxels passed through the network ÷ output voxels, for this run and, computed
from the block layout, for a 2000×512×512 recording at the default GPU block.

Part 2: end-to-end wall time of ``denoise`` (Zarr in → Zarr out, one single-threaded worker,
cluster start-up excluded) ÷ the time of bare forward passes over the same blocks in one
thread.

Part 3: peak RSS of ``deepcad-chunked denoise`` for a recording 1× and 8× as long.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import torch
from _common import machine, noisy_frames, run_measured
from distributed import Client, LocalCluster

from deepcad_chunked import DenoiseConfig, convert, denoise, predict_array
from deepcad_chunked.infer.memory import network_voxels
from deepcad_chunked.infer.predict import denoise_dask
from deepcad_chunked.jobs.denoise import DEFAULT_BLOCKS
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.unet3d import UNet3D


def redundancy(shape: tuple[int, ...], block: tuple[int, ...], halo: int) -> float:
    """Network input voxels ÷ output voxels for our block layout."""
    return network_voxels(shape, block, halo) / math.prod(shape)


def _cores(n: int, b: int) -> list[int]:
    padded = n + (-n % 8)
    return [b] * (padded // b) + ([padded % b] if padded % b else [])


def deepcad_rt(model: UNet3D, raw: np.ndarray, tile: int = 144, stride: int = 72
               ) -> tuple[np.ndarray, float]:
    """DeepCAD-RT's inference scheme: overlapping tiles, centre crop, per-tile gain."""
    norm = model.normalization
    x = (raw.astype(np.float32) - norm["mean"]) / norm["std"]
    pads = [(0, max(0, tile - n)) for n in x.shape]
    x = np.pad(x, pads, mode="symmetric")
    out = np.zeros_like(x)
    starts = [sorted({*range(0, n - tile + 1, stride), n - tile}) for n in x.shape]
    margin = (tile - stride) // 2
    passed = 0
    for t0 in starts[0]:
        for y0 in starts[1]:
            for x0 in starts[2]:
                sl = (slice(t0, t0 + tile), slice(y0, y0 + tile), slice(x0, x0 + tile))
                with torch.no_grad():
                    pred = model(torch.from_numpy(x[sl].copy())[None, None])[0, 0].numpy()
                passed += pred.size
                raw_tile = x[sl] * norm["std"] + norm["mean"]
                pred = pred * norm["std"] + norm["mean"]
                pred *= np.sqrt(max(raw_tile.sum(), 1e-6) / max(pred.sum(), 1e-6))
                keep = []
                for s, n in zip((t0, y0, x0), x.shape, strict=True):
                    lo = 0 if s == 0 else margin
                    hi = tile if s + tile == n else tile - margin
                    keep.append((lo, hi))
                dst = tuple(slice(s + lo, s + hi) for s, (lo, hi) in zip((t0, y0, x0), keep,
                                                                         strict=True))
                src = tuple(slice(lo, hi) for lo, hi in keep)
                out[dst] = pred[src]
    crop = tuple(slice(0, n) for n in raw.shape)
    return out[crop], passed / raw.size


def part1(raw: np.ndarray, model_path: Path, client: Client) -> None:
    """Print redundancy and seam error of (a), (b) and (c)."""
    model = load_model(model_path)
    t0 = time.perf_counter()
    want = predict_array(model, raw)
    mono = time.perf_counter() - t0
    span = float(raw.max() - raw.min())
    big, gpu = (2000, 512, 512), DEFAULT_BLOCKS["cuda"]
    print("\n| setting | halo | seam error ÷ range | redundancy (this run) | "
          "redundancy (2000×512², GPU block) | minutes |")
    print("|---|---|---|---|---|---|")
    block = (64, 96, 96)
    for name, halo in (("(a) default", 48), ("(b) fast", 16)):
        t0 = time.perf_counter()
        lazy = denoise_dask(da.from_array(raw, chunks=(32, 96, 96)), model_path,
                            block=block, halo=halo)
        err = float(np.abs(client.compute(lazy).result() - want).max()) / span
        print(f"| {name}, blocks {block} | {halo} | {err:.2e} | "
              f"{redundancy(raw.shape, block, halo):.2f} | {redundancy(big, gpu, halo):.2f} | "
              f"{(time.perf_counter() - t0) / 60:.1f} |", flush=True)
    t0 = time.perf_counter()
    got, factor = deepcad_rt(model, raw)
    err = float(np.abs(got - want).max()) / span
    tiles = math.prod(len(sorted({*range(0, n - 144 + 1, 72), n - 144})) for n in big) * 144**3
    print(f"| (c) DeepCAD-RT scheme, 144³ tiles, stride 72 | – | {err:.2e} | {factor:.2f} | "
          f"{tiles / math.prod(big):.2f} | {(time.perf_counter() - t0) / 60:.1f} |")
    print(f"\n(monolithic predict_array: {mono / 60:.1f} min)")


def part2(store: Path, model_path: Path, work: Path, block: tuple[int, int, int]) -> None:
    """Print end-to-end ÷ bare forward time."""
    torch.set_num_threads(1)
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        denoise(store, model_path, work / "warm.zarr", config=DenoiseConfig(block=block),
                cluster=client, progress=False)  # workers import torch and load the model
        t0 = time.perf_counter()
        out = denoise(store, model_path, work / "e2e.zarr", config=DenoiseConfig(block=block),
                      cluster=client, progress=False)
        e2e = time.perf_counter() - t0
    model = load_model(model_path)
    shape = out.shape
    bare = 0.0
    for sizes in _task_inputs(shape, block, 48):
        x = torch.zeros(1, 1, *sizes)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        bare += time.perf_counter() - t0
    print("\n| recording | block | end-to-end s | bare forward s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {shape} | {block} | {e2e:.1f} | {bare:.1f} | {e2e / bare:.2f} |")


def _task_inputs(shape: tuple[int, ...], block: tuple[int, ...], halo: int):
    axes = [[c + 2 * halo for c in _cores(n, b)] for n, b in zip(shape, block, strict=True)]
    for t in axes[0]:
        for y in axes[1]:
            for x in axes[2]:
                yield (t, y, x)


def part3(work: Path, frames: int, model_path: Path) -> None:
    """Print peak RSS for 1× and 8× recordings."""
    print("\n| recording | frames | wall s | peak RSS MiB, all processes at once | "
          "sum of each process's peak MiB |")
    print("|---|---|---|---|---|")
    peaks, sums = [], []
    for factor in (1, 8):
        tif = work / f"r{factor}.tif"
        pool = noisy_frames(64, 96, 96)
        n = frames * factor
        tifffile.imwrite(tif, (pool[t % 64] for t in range(n)), shape=(n, 96, 96),
                         dtype=np.uint16, photometric="minisblack")
        store = convert(tif, work / f"r{factor}.zarr", workers=2, progress=False).path
        cmd = [sys.executable, "-m", "deepcad_chunked.cli.main", "-q", "denoise", str(store),
               "-m", str(model_path), "-o", str(work / f"d{factor}.zarr"), "--block",
               "64,96,96", "--workers", "2", "--device", "cpu", "--no-progress"]
        m = run_measured(cmd)
        peaks.append(m.peak_rss_bytes)
        sums.append(m.peak_sum_bytes)
        print(f"| {factor}× | {n} | {m.seconds:.0f} | {m.peak_rss_bytes / 2**20:.0f} | "
              f"{m.peak_sum_bytes / 2**20:.0f} (exit {m.returncode}) |", flush=True)
    print(f"\npeak RSS ratio 8× / 1×: {peaks[1] / peaks[0]:.3f} (at once), "
          f"{sums[1] / sums[0]:.3f} (sum of peaks)")


def main() -> None:
    """Run the three parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-seams", action="store_true")
    args = parser.parse_args()
    print(f"# machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="bench-denoise-"))
    try:
        torch.manual_seed(0)
        raw = noisy_frames(args.frames, args.size, args.size)
        model_path = Checkpoint(model_state=UNet3D(args.features).state_dict(),
                                features=args.features,
                                normalization={"mean": float(raw.mean()),
                                               "std": float(raw.std())}).save(work / "m.pt")
        print(f"# recording {raw.shape} uint16, f = {args.features} (random weights)")
        if not args.skip_seams:
            with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                              dashboard_address="127.0.0.1:0") as cluster, \
                    Client(cluster) as client:
                part1(raw, model_path, client)
        tifffile.imwrite(work / "raw.tif", raw, photometric="minisblack")
        store = convert(work / "raw.tif", work / "raw.zarr", workers=1, progress=False).path
        part2(store, model_path, work, (64, 96, 96))
        if not args.skip_rss:
            small = Checkpoint(model_state=UNet3D(4).state_dict(), features=4,
                               normalization={"mean": 100.0, "std": 20.0}).save(work / "s.pt")
            part3(work, 256, small)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
