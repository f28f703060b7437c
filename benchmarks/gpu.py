"""Inference on a CUDA GPU: forward passes, memory per voxel, the default block, end to end.

One command on a machine with a CUDA GPU, a few minutes:

1. One forward pass of the f = 16 network (with training's default linear bypass, or
   ``--bypass none``) over one default GPU block with the exact halo, for each forward (the
   module's own, the memory-lean one), memory layout (contiguous, channels-last 3D) and
   precision (fp32 — TF32 off, as ``denoise`` runs it —, tf32, bf16, fp16); then the fastest
   of each precision again under ``torch.compile``. Per row: milliseconds per pass, 512×512
   frames per second it amounts to (core voxels ÷ 512²), peak GPU memory per input voxel, and
   the error against fp32 (max |Δ| ÷ range of the fp32 output, over the block's core).
2. The default GPU block that the measured fp32 memory per voxel allows on this GPU, and its
   redundancy (network voxels ÷ output voxels) on a long 512×512 recording.
3. ``denoise`` Zarr → Zarr at default settings on a ``LocalCUDACluster`` of one GPU, then of
   all GPUs (one worker per GPU, a second thread reading and writing beside its passes;
   a LocalCluster with a ``GPU`` resource where dask-cuda is not installed): output frames per
   second, cluster start-up excluded, and the error against ``predict_array`` on its first
   frames.
4. Training (``train --devices N``) on one GPU and on all GPUs of the machine, two tiles per
   GPU and step: steps and tiles per second.

``--record`` appends the tables to benchmarks/RESULTS.md. ``--dry-run`` runs every step on
the CPU with a tiny network and recording (to check the script, not to measure anything).

    python benchmarks/gpu.py [--frames 1000] [--bypass none] [--no-compile] [--record] [--dry-run]
"""

from __future__ import annotations

import argparse
import functools
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import torch
from _common import machine, noisy_frames, publish

from deepcad_chunked import DenoiseConfig, convert, denoise, predict_array
from deepcad_chunked.cluster import INFERENCE_RESOURCES
from deepcad_chunked.config import BYPASS_KERNEL, INFERENCE_THREADS
from deepcad_chunked.infer.lean import lean_forward
from deepcad_chunked.infer.memory import GPU_FRACTION, fit_block, network_voxels
from deepcad_chunked.infer.predict import default_halo
from deepcad_chunked.jobs.denoise import DEFAULT_BLOCKS
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.unet3d import UNet3D

FRAME = 512 * 512
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}


def _timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int
           ) -> tuple[float, torch.Tensor]:
    """Best seconds of ``repeats`` calls after one warm-up (compilation, autotuning)."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def network(features: int, bypass: tuple[int, int, int] | None) -> UNet3D:
    """A seeded random network; with a bypass, its last layer made non-zero as training makes
    it (a fresh one is zero: the output would be the bypass alone)."""
    torch.manual_seed(0)
    model = UNet3D(features, bypass=bypass)
    if bypass is not None:
        torch.nn.init.normal_(model.final.weight, std=0.05)
    return model


def forward_rows(features: int, bypass: tuple[int, int, int] | None, core: tuple[int, ...],
                 halo: int, device: torch.device, compile_best: bool, repeats: int
                 ) -> list[dict]:
    """Part 1: one row per forward × layout × precision (and compiled bests)."""
    model = network(features, bypass).to(device).eval()
    shape = tuple(c + 2 * halo for c in core)
    x = torch.randn(1, 1, *shape, device=device)
    inner = (0, 0, *(slice(halo, halo + c) for c in core))
    forwards = {"module": model, "lean": functools.partial(lean_forward, model)}
    layouts = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last_3d}
    rows, reference = [], None

    def run(name: str, fn: Callable, layout: str, precision: str, compiled: bool) -> dict:
        nonlocal reference
        model.to(memory_format=layouts[layout])
        xin = x.contiguous(memory_format=layouts[layout])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        dtype = DTYPES[precision]
        target = torch.compile(fn) if compiled else fn

        def call() -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                                 enabled=dtype != torch.float32):
                return target(xin)

        row = {"forward": name, "layout": layout, "precision": precision,
               "compiled": compiled}
        try:
            seconds, out = _timed(call, device, repeats)
        except Exception as exc:
            return {**row, "failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
        peak = (torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0)
        out = out[inner].float()
        if reference is None:
            reference = out
        span = float(reference.max() - reference.min()) or 1.0
        row.update(seconds=seconds, fps=math.prod(core) / FRAME / seconds,
                   bytes_per_voxel=peak / x.numel(),
                   error=float((out - reference).abs().max()) / span)
        return row

    for name, fn in forwards.items():
        for layout in layouts:
            for precision in DTYPES:
                rows.append(run(name, fn, layout, precision, False))
                print(rows[-1], flush=True)
    if compile_best:
        for precision in DTYPES:
            done = [r for r in rows if r["precision"] == precision and "seconds" in r]
            if not done:
                continue
            best = min(done, key=lambda r: r["seconds"])
            rows.append(run(best["forward"], forwards[best["forward"]], best["layout"],
                            precision, True))
            print(rows[-1], flush=True)
    return rows


def end_to_end(frames: int, size: int, features: int, bypass: tuple[int, int, int] | None,
               work: Path, device: str, compare: int, gpus: int = 1) -> dict:
    """Part 3: ``denoise`` Zarr → Zarr at default settings on a local cluster of ``gpus``
    GPU workers (each with a thread for reads and writes beside its forward passes)."""
    from distributed import Client, LocalCluster

    pool = noisy_frames(64, size, size)
    tif = work / "rec.tif"
    if not tif.exists():
        tifffile.imwrite(tif, (pool[t % 64] for t in range(frames)),
                         shape=(frames, size, size), dtype=np.uint16, photometric="minisblack",
                         bigtiff=True)
    store = (work / "rec.zarr") if (work / "rec.zarr").exists() else convert(
        tif, work / "rec.zarr", progress=False).path
    model = Checkpoint(model_state=network(features, bypass).state_dict(), features=features,
                       normalization={"mean": float(pool.mean()),
                                      "std": float(pool.std())}).save(work / "m.pt")
    kind = "LocalCluster (CPU)"
    if device == "cuda":
        try:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(n_workers=gpus, threads_per_worker=INFERENCE_THREADS,
                                       host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                       resources={"GPU": 1})
            kind = f"LocalCUDACluster, {gpus} GPU(s)"
        except ImportError:
            cluster = LocalCluster(n_workers=gpus, threads_per_worker=INFERENCE_THREADS,
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                   resources={"GPU": 1})
            kind = f"LocalCluster + GPU resource, {gpus} worker(s) (no dask-cuda)"
    else:
        cluster = LocalCluster(n_workers=1, threads_per_worker=INFERENCE_THREADS,
                               host="127.0.0.1", dashboard_address="127.0.0.1:0",
                               resources=INFERENCE_RESOURCES)
    with cluster, Client(cluster) as client:
        small = work / "warm.zarr"
        denoise(store, model, small, cluster=client, progress=False,
                config=DenoiseConfig(block=(64, 64, 64)))  # workers load torch and the model
        start = time.perf_counter()
        rec = denoise(store, model, work / f"out{gpus}.zarr", cluster=client, progress=False,
                      config=DenoiseConfig(dtype="float32"))
        seconds = time.perf_counter() - start
    params = rec.attrs["parameters"]
    head = np.asarray(rec.to_dask()[:compare])
    raw = np.asarray(open_store_frames(store, compare))
    want = predict_array(load_model(model), raw, device=device)
    # the first frames of a long recording differ from a short one only in its far end:
    # compare those at least a halo away from it
    keep = compare - params["halo"]
    span = float(want[:keep].max() - want[:keep].min()) or 1.0
    error = float(np.abs(head[:keep] - want[:keep]).max()) / span
    return {"cluster": kind, "frames": frames, "seconds": seconds, "fps": frames / seconds,
            "block": tuple(params["block"]), "halo": params["halo"],
            "redundancy": network_voxels((frames, size, size), params["block"],
                                         params["halo"]) / (frames * size * size),
            "error": error}


def training_rate(work: Path, features: int, bypass: tuple[int, int, int] | None,
                  device: str, devices: int, dry: bool) -> dict:
    """Part 4: training steps per second on ``devices`` GPUs (data-parallel), the batch of
    each GPU fixed: the rate between a short and a long run, start-up cancelled out."""
    from deepcad_chunked import TrainConfig, train

    per_device = 1 if dry else 2
    patch = (8, 16, 16) if dry else (16, 64, 64)
    config = TrainConfig(features=features, bypass=bypass, epochs=1, workers=0 if dry else 2,
                         device=device, val_tiles=1, calibrate=False, patch=patch,
                         batch_size=per_device * devices, devices=devices)
    steps = (2, 6) if dry else (20, 120)
    took = []
    for n in steps:
        run = work / f"train{devices}-{n}"
        start = time.perf_counter()
        train(work / "rec.zarr", run, config=config.model_copy(update={"steps_per_epoch": n}),
              progress=False)
        took.append(time.perf_counter() - start)
    rate = (steps[1] - steps[0]) / (took[1] - took[0]) if took[1] > took[0] else math.nan
    return {"devices": devices, "batch": config.batch_size, "patch": ",".join(map(str, patch)),
            "steps_per_s": rate, "tiles_per_s": rate * config.batch_size}


def open_store_frames(store: Path, n: int) -> np.ndarray:
    """The first ``n`` frames of a recording store."""
    from deepcad_chunked.store.recording import open_recording

    return np.asarray(open_recording(store).to_dask()[:n])


def main() -> None:
    """Run the three parts; print the tables (and append them with ``--record``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--bypass", default=",".join(map(str, BYPASS_KERNEL)),
                        metavar="T,Y,X|none", help="the network's linear bypass (default: "
                        "training's; none: DeepCAD-RT's network as published)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU, to check the script")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device is visible (use --dry-run to check the script)")
    device = torch.device("cpu" if dry else "cuda")
    features = 2 if dry else args.features
    bypass = None if args.bypass == "none" else tuple(int(k) for k in args.bypass.split(","))
    halo = 8 if dry else default_halo()
    core = (16, 32, 32) if dry else DEFAULT_BLOCKS["cuda"]
    size, frames = (64, 40) if dry else (512, args.frames)
    name = ("CPU dry run" if dry else torch.cuda.get_device_name(0))
    lines = [f"{machine()}; {name}; torch {torch.__version__}; f = {features}, bypass "
             f"{args.bypass}, block {'×'.join(map(str, core))} + halo {halo}", "",
             "| forward | layout | precision | compiled | ms/pass | 512² frames/s | "
             "GPU B/voxel | error ÷ range vs fp32 |", "|---|---|---|---|---|---|---|---|"]
    rows = forward_rows(features, bypass, core, halo, device, not (dry or args.no_compile),
                        1 if dry else args.repeats)
    for r in rows:
        head = f"| {r['forward']} | {r['layout']} | {r['precision']} | {r['compiled']} |"
        if "failed" in r:
            lines.append(f"{head} {r['failed']} | | | |")
        else:
            lines.append(f"{head} {r['seconds'] * 1e3:.0f} | {r['fps']:.0f} | "
                         f"{r['bytes_per_voxel']:.0f} | {r['error']:.1e} |")
    fp32 = [r for r in rows if r.get("precision") == "fp32" and "bytes_per_voxel" in r
            and r["forward"] == "lean"]
    if fp32 and device.type == "cuda":
        per_voxel = max(r["bytes_per_voxel"] for r in fp32)
        total = torch.cuda.get_device_properties(0).total_memory
        budget = int(total * GPU_FRACTION / per_voxel)
        long = (20000, 512, 512)
        block = fit_block(long, halo, budget, largest=(512, 512, 512), step=(32, 128, 128))
        lines += ["", f"Default block from measured memory: {per_voxel:.0f} B per input voxel "
                  f"(lean, fp32) × {GPU_FRACTION:.0%} of {total / 2**30:.0f} GiB → "
                  f"{budget / 1e6:.0f} M voxels → block {'×'.join(map(str, block))}, "
                  f"redundancy {network_voxels(long, block, halo) / math.prod(long):.2f} on "
                  f"512×512 (today's default {'×'.join(map(str, DEFAULT_BLOCKS['cuda']))}: "
                  f"{network_voxels(long, DEFAULT_BLOCKS['cuda'], halo) / math.prod(long):.2f})"]
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    try:
        e2e = [end_to_end(frames, size, features, bypass, work, device.type,
                          compare=min(frames, 32 if dry else 96), gpus=n)
               for n in sorted({1, gpus})]
        training = [training_rate(work, features, bypass, device.type, n, dry)
                    for n in sorted({1, gpus})]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines += ["", "| denoise Zarr → Zarr | frames | block | redundancy | s | frames/s | "
              "error ÷ range vs predict_array |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {e['cluster']} | {e['frames']}×{size}² | "
              f"{'×'.join(map(str, e['block']))} | {e['redundancy']:.2f} | "
              f"{e['seconds']:.1f} | {e['fps']:.0f} | {e['error']:.1e} |" for e in e2e]
    lines += ["", "| training (`train --devices N`) | tiles per step | steps/s | tiles/s |",
              "|---|---|---|---|"]
    lines += [f"| {t['devices']} device(s), patch {t['patch']}, f = {features} | "
              f"{t['batch']} | {t['steps_per_s']:.2f} | {t['tiles_per_s']:.1f} |"
              for t in training]
    publish("Inference on a GPU", "\n".join(lines), args.record and not dry)


if __name__ == "__main__":
    main()
