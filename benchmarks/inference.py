"""Inference end to end: ``convert`` + ``denoise`` at default settings, side by side with
DeepCAD-RT's tiling and, optionally, with an earlier version of this package.

On one synthetic uint16 recording and one network (random weights: the geometry and the
arithmetic decide the time, not the training), each in one run on this machine:

- (a) DeepCAD-RT's test scheme re-implemented as ``benchmarks/denoise.py`` does (144³ tiles —
  150 on the 8-voxel grid — overlap 0.5, centre crop, per-tile gain), through the module's own
  forward with ``torch`` on every core: read the TIFF, denoise, write the TIFF;
- (b) ``deepcad-chunked convert`` then ``deepcad-chunked denoise`` at default settings
  (TIFF → Zarr → Zarr), as a user runs them, start-up of their local clusters included;
- (c) with ``--baseline DIR``, the same two commands from the source tree ``DIR`` (a second
  git worktree of an earlier commit), run with this environment's packages.

For (b) the block chosen and the network voxels per output voxel (redundancy) are read
from the output store; the error of (b) is ``max |x − predict_array| ÷ range`` (skipped with
``--skip-exact``, which a large recording needs: the monolithic pass holds it whole).

    python benchmarks/inference.py [--frames 160] [--size 192] [--features 16]
        [--baseline /tmp/old] [--skip-deepcad-rt] [--skip-exact] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import machine, noisy_frames, publish
from denoise import deepcad_rt

from deepcad_chunked import predict_array
from deepcad_chunked.infer.memory import network_voxels
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.store.recording import open_recording


def _recording(frames: int, size: int) -> np.ndarray:
    pool = noisy_frames(min(frames, 64), size, size)
    return pool[np.arange(frames) % len(pool)]


def run_deepcad_rt(tif: Path, model_path: Path, out: Path) -> float:
    """Seconds of (a): TIFF in, tiles through the module's forward, TIFF out."""
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    raw = tifffile.imread(tif)
    model = load_model(model_path).eval()
    result, _ = deepcad_rt(model, raw)
    tifffile.imwrite(out, result.clip(0, 65535).round().astype(np.uint16))
    return time.perf_counter() - start


def run_ours(source: Path, tif: Path, model_path: Path, work: Path) -> tuple[float, Path]:
    """Seconds of ``convert`` + ``denoise`` from the package in ``source``, and the output."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    cli = [sys.executable, "-m", "deepcad_chunked.cli.main", "-q"]
    store, out = work / "rec.zarr", work / "den.zarr"
    start = time.perf_counter()
    for args in (["convert", str(tif), "-o", str(store)],
                 ["denoise", str(store), "-m", str(model_path), "-o", str(out),
                  "--no-progress"]):
        subprocess.run([*cli, *args], env=env, check=True, cwd=work)
    return time.perf_counter() - start, out


def main() -> None:
    """Run (a), (b) and (c) and print (or append) one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--baseline", type=Path, help="source tree of an earlier version")
    parser.add_argument("--skip-deepcad-rt", action="store_true")
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    lines = [f"machine: {machine()}",
             f"recording {args.frames}×{args.size}×{args.size} uint16, f = {args.features}",
             "", "| run | seconds | output voxels/s | × (a) | block | redundancy | error ÷ range |",
             "|---|---|---|---|---|---|---|"]
    try:
        raw = _recording(args.frames, args.size)
        tif = work / "rec.tif"
        tifffile.imwrite(tif, raw, photometric="minisblack", metadata={"axes": "TYX"})
        torch.manual_seed(0)
        model_path = Checkpoint(model_state=UNet3D(args.features).state_dict(),
                                features=args.features,
                                normalization={"mean": float(raw.mean()),
                                               "std": float(raw.std())}).save(work / "m.pt")
        want = None
        if not args.skip_exact:
            want = predict_array(load_model(model_path), raw)
        span = float(raw.max() - raw.min())
        reference = None
        if not args.skip_deepcad_rt:
            reference = run_deepcad_rt(tif, model_path, work / "deepcad_rt.tif")
            lines.append(f"| (a) DeepCAD-RT tiling, 144³, overlap 0.5 | {reference:.1f} | "
                         f"{raw.size / reference / 1e6:.2f} M | 1.00 | – | – | – |")
            print(lines[-1], flush=True)
        runs = [("(b) convert + denoise, defaults", here.parent)]
        if args.baseline:
            commit = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short",
                                     "HEAD"], capture_output=True, text=True).stdout.strip()
            runs.append((f"(c) the same, at {commit}", args.baseline.resolve()))
        for name, source in runs:
            folder = work / name[1]
            folder.mkdir()
            seconds, out = run_ours(source, tif, model_path, folder)
            rec = open_recording(out)
            params = rec.attrs["parameters"]
            block, halo = tuple(params["block"]), params["halo"]
            redundancy = network_voxels(raw.shape, block, halo) / raw.size
            error = "–"
            if want is not None:
                got = np.asarray(rec.to_dask()).astype(np.float32)
                # the output is stored as uint16: rounding adds up to 0.5 of a count
                error = f"{float(np.abs(got - want).max()) / span:.1e}"
            ratio = f"{reference / seconds:.2f}" if reference else "–"
            lines.append(f"| {name} | {seconds:.1f} | {raw.size / seconds / 1e6:.2f} M | "
                         f"{ratio} | {'×'.join(map(str, block))} | {redundancy:.2f} | "
                         f"{error} |")
            print(lines[-1], flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish("Inference end to end", "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
