"""Same results, same speed: this checkout against another (the previous main, say).

Usage: python benchmarks/same_behaviour.py --baseline DIR [--frames 192] [--size 64]
       [--repeats 2]

``DIR`` is a checkout of another commit (``git worktree add /tmp/base main~5``). Each
checkout's library is imported from its own folder (its ``deepcad_chunked/`` first on the
path) in a process of its own, and runs the same jobs on the same inputs through the public
API: ``convert`` a TIFF recording, ``train`` a small network (fixed seed, loading in the
training process), ``denoise`` the recording with it, and ``follow`` a folder of the same
frames as TIFF files. The two are run alternately, ``--repeats`` times each, and compared:

- every chunk file of the recording and denoised stores, byte for byte, and their arrays;
- the trained weights, tensor by tensor (bit-identical, not within a tolerance);
- the median seconds of each job, as a ratio (this checkout / the other), measured side by
  side in one run.

Prints a Markdown table; the exit code is 1 when any result differs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from _common import machine

log = logging.getLogger("same_behaviour")
HERE = Path(__file__).resolve().parents[1]

#: The jobs, run in a child process whose ``sys.path`` starts with the checkout's folder.
JOBS = r'''
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import deepcad_chunked as dc
from deepcad_chunked.config import ConvertConfig, DenoiseConfig, FollowConfig, TrainConfig
assert Path(dc.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), dc.__file__
src, out = Path(sys.argv[2]), Path(sys.argv[3])
times = {}
t = time.perf_counter()
dc.convert([src / "rec.tif"], out / "rec.zarr", config=ConvertConfig(chunks=(16, 32, 32)),
           workers=1, progress=False)
times["convert"] = time.perf_counter() - t
t = time.perf_counter()
dc.train(out / "rec.zarr", out / "run", config=TrainConfig(
    features=4, patch=(16, 32, 32), epochs=2, steps_per_epoch=6, batch_size=2, workers=0,
    val_tiles=2, seed=3), progress=False)
times["train"] = time.perf_counter() - t
t = time.perf_counter()
dc.denoise(out / "rec.zarr", out / "run" / "last.pt", out / "den.zarr",
           config=DenoiseConfig(block=(64, 64, 64)), workers=1, progress=False)
times["denoise"] = time.perf_counter() - t
t = time.perf_counter()
dc.follow(src / "acq", out / "run" / "last.pt", out / "follow",
          config=FollowConfig(idle_timeout=1.0, block_frames=16, max_block_frames=64),
          workers=1)
times["follow"] = time.perf_counter() - t
print(json.dumps(times))
'''


def _inputs(folder: Path, frames: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    clean = 20 + 60 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / 40.0)
    pulse = 1 + np.sin(np.arange(frames) / 7.0)[:, None, None] ** 2
    movie = rng.poisson(clean[None] * pulse).astype(np.uint16)
    tifffile.imwrite(folder / "rec.tif", movie, photometric="minisblack")
    (folder / "acq").mkdir()
    for i in range(0, frames, 64):
        tifffile.imwrite(folder / "acq" / f"file_{i // 64:05d}.tif", movie[i:i + 64],
                         photometric="minisblack")


def _run(checkout: Path, inputs: Path, out: Path) -> dict[str, float]:
    out.mkdir(parents=True)
    # the checkout first on the path of the job and of its cluster's worker processes
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", JOBS, str(checkout), str(inputs), str(out)],
                          capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"{checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _chunk_files(store: Path) -> dict[str, bytes]:
    """Every chunk file of the store's arrays (metadata, which holds times and paths, left
    out), by path inside the store."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs", ".zgroup")
            and ".progress" not in p.parts and not p.name.startswith(".")}


def _weights(path: Path) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state["model_state"].items()}


def _differences(a: Path, b: Path) -> list[str]:
    out = []
    for store in ("rec.zarr", "den.zarr", "follow/recording.zarr", "follow/denoised.zarr"):
        mine, theirs = _chunk_files(a / store), _chunk_files(b / store)
        if not mine:
            out.append(f"{store}: no chunk files")
        elif mine != theirs:
            differ = sorted(k for k in mine.keys() | theirs.keys()
                            if mine.get(k) != theirs.get(k))
            out.append(f"{store}: {len(differ)} of {len(mine)} chunk files differ")
    wa, wb = _weights(a / "run" / "last.pt"), _weights(b / "run" / "last.pt")
    if wa.keys() != wb.keys() or any(wa[k].tobytes() != wb[k].tobytes() for k in wa):
        out.append("trained weights differ")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=192)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trees = {"this checkout": HERE, "baseline": args.baseline.resolve()}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        _inputs(inputs, args.frames, args.size)
        outs: dict[str, Path] = {}
        for r in range(args.repeats):
            for name, tree in trees.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}_{r}"
                log.info("run %d of %s (%s)", r + 1, name, tree)
                for job, seconds in _run(tree, inputs, out).items():
                    times[name].setdefault(job, []).append(seconds)
                outs.setdefault(name, out)
        differences = _differences(outs["this checkout"], outs["baseline"])
    print(f"\n{machine()}; {args.frames} frames of {args.size}², {args.repeats} runs each, "
          f"alternating; baseline {args.baseline}\n")
    print("| job | this checkout (s) | baseline (s) | ratio |")
    print("|---|---|---|---|")
    for job in times["this checkout"]:
        mine = statistics.median(times["this checkout"][job])
        theirs = statistics.median(times["baseline"][job])
        print(f"| {job} | {mine:.2f} | {theirs:.2f} | {mine / theirs:.2f} |")
    print("\nresults: " + ("identical (every chunk file of the four stores, the weights)"
                           if not differences else "; ".join(differences)))
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
