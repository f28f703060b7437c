"""Side by side with DeepCAD-RT: the same simulated recording, the same wall time, the same machine.

Usage: python benchmarks/peer.py --deepcad-rt PATH [--budgets 150 600] [--photons 1]
       [--frames 1200] [--size 128] [--peer-lr 5e-5] [--peer-fmap 16] [--peer-patch 64,64,64]

PATH is a checkout of DeepCAD-RT (``git clone https://github.com/cabooster/DeepCAD-RT``) whose
own requirements are installed (its ``deepcad`` package imports cv2, csbdeep, gdown,
scikit-image and yaml: ``pip install opencv-python-headless csbdeep gdown scikit-image
pyyaml``). Its training and test code are imported from the checkout and run as published, in
child processes; on a machine without a GPU their ``.cuda()`` calls are redirected to the CPU
at run time (nothing else is changed). Its training gets the budget and then the rest of the
epoch it is in (it saves a model at the end of each epoch), so it is never given less time
than ours; the table shows the time it took.

For each budget: ours (the demo's settings, :data:`deepcad_chunked.jobs.run.DEMO_TRAINING`,
trained for as many steps as fit in the budget) and DeepCAD-RT (its demo's learning rate and
network unless told otherwise; patches that fit the 128² frames) denoise the whole recording;
both are scored against the ground truth (SNR, mean trace correlation), with the best
(oracle-tuned) 3D Gaussian filter. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from _common import denoise_in_memory, machine, train_for

from deepcad_chunked import convert
from deepcad_chunked.config import SimulationConfig
from deepcad_chunked.jobs.run import DEMO_TRAINING
from deepcad_chunked.metrics import score
from deepcad_chunked.simulate import simulate

HOW = ("this benchmark needs a checkout of DeepCAD-RT: git clone "
       "https://github.com/cabooster/DeepCAD-RT, pip install opencv-python-headless csbdeep "
       "gdown scikit-image pyyaml, then python benchmarks/peer.py --deepcad-rt "
       "DeepCAD-RT")


def _package_dir(checkout: Path) -> Path | None:
    for candidate in (checkout / "DeepCAD_RT_pytorch", checkout):
        if (candidate / "deepcad" / "train_collection.py").is_file():
            return candidate
    return None


def _on_the_cpu() -> None:
    """Redirect ``.cuda()`` to the CPU when there is no GPU (DeepCAD-RT calls it unguarded)."""
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def _child(args: argparse.Namespace) -> None:
    """In a child process: DeepCAD-RT's training (``--child train``) or test (``test``)."""
    sys.path.insert(0, str(args.package))
    _on_the_cpu()
    pt, py, px = args.peer_patch
    common = {"patch_x": px, "patch_y": py, "patch_t": pt, "fmap": args.peer_fmap,
              "GPU": "0", "num_workers": 0, "colab_display": True,
              "visualize_images_per_epoch": False}
    if args.child == "train":
        from deepcad.train_collection import training_class

        training_class({**common, "overlap_factor": 0.25, "scale_factor": 1,
                        "select_img_num": 10**6, "train_datasets_size": args.peer_tiles,
                        "datasets_path": str(args.data), "pth_dir": str(args.out),
                        "n_epochs": 10**6, "lr": args.peer_lr, "b1": 0.5, "b2": 0.999,
                        "save_test_images_per_epoch": False}).run()
    else:
        from deepcad.test_collection import testing_class

        testing_class({**common, "overlap_factor": 0.5, "scale_factor": 1,
                       "test_datasize": 10**6, "datasets_path": str(args.data),
                       "pth_dir": str(args.model.parent.parent),
                       "denoise_model": args.model.parent.name,
                       "output_dir": str(args.out)}).run()


def _spawn(kind: str, args: argparse.Namespace, **paths: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, __file__, "--child", kind, "--package", str(args.package),
           "--peer-lr", str(args.peer_lr), "--peer-fmap", str(args.peer_fmap),
           "--peer-patch", ",".join(map(str, args.peer_patch)),
           "--peer-tiles", str(args.peer_tiles)]
    for name, value in paths.items():
        cmd += [f"--{name}", str(value)]
    # DeepCAD-RT writes ./results and ./onnx folders: run it beside its outputs
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=paths["out"].parent)


def peer_train(args: argparse.Namespace, data: Path, out: Path, seconds: float
               ) -> tuple[Path, float]:
    """DeepCAD-RT trained for ``seconds`` and the rest of that epoch: (its model, minutes)."""
    t0 = time.perf_counter()
    proc = _spawn("train", args, data=data, out=out)
    newest: Path | None = None
    while proc.poll() is None:
        time.sleep(1.0)
        models = sorted(out.glob("*/E_*.pth"), key=lambda p: p.stat().st_mtime)
        if models:
            newest = models[-1]
        if newest is not None and newest.stat().st_mtime - _start_time(t0) >= seconds:
            break
    minutes = (time.perf_counter() - t0) / 60
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if newest is None:
        raise SystemExit(f"DeepCAD-RT's training saved no model: "
                         f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return newest, minutes


_CLOCK_OFFSET = time.time() - time.perf_counter()


def _start_time(t0: float) -> float:
    """A ``perf_counter`` reading as wall-clock time (to compare with file times)."""
    return t0 + _CLOCK_OFFSET


def peer_test(args: argparse.Namespace, data: Path, model: Path, out: Path) -> np.ndarray:
    """DeepCAD-RT's test code on the recording with ``model``: its output."""
    chosen = out / "models" / "chosen" / model.name  # its test takes a folder's "last" model
    chosen.parent.mkdir(parents=True)
    shutil.copy(model, chosen)
    proc = _spawn("test", args, data=data, model=chosen, out=out)
    _, err = proc.communicate()
    outputs = sorted(out.rglob("*_output.tif"))
    if proc.returncode != 0 or not outputs:
        raise SystemExit(f"DeepCAD-RT's test failed: {err.decode()[-2000:]}")
    return tifffile.imread(outputs[-1])


def _row(budget: float, name: str, minutes: float, s: dict[str, Any]) -> str:
    ours = s["rows"][0]
    gauss = next(r for r in s["rows"] if r["name"] == s["best_gaussian"])
    return (f"| {budget:.0f} s | {name} | {minutes:.1f} | {ours['snr_db']:.2f} | "
            f"{gauss['snr_db']:.2f} | {s['gain_over_gaussian_db']:+.2f} | "
            f"{ours['trace_r_mean']:.3f} / {gauss['trace_r_mean']:.3f} |")


def main() -> None:
    """Train and test both, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepcad-rt", type=Path, metavar="PATH")
    parser.add_argument("--budgets", type=float, nargs="+", default=[150.0, 600.0])
    parser.add_argument("--photons", type=float, default=1.0)
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--peer-lr", type=float, default=5e-5, help="DeepCAD-RT's demo: 5e-5")
    parser.add_argument("--peer-fmap", type=int, default=16, help="DeepCAD-RT's network: 16")
    parser.add_argument("--peer-patch", type=lambda t: tuple(int(v) for v in t.split(",")),
                        default=(64, 64, 64), metavar="T,Y,X",
                        help="DeepCAD-RT's patch_t, patch_y, patch_x (its demo's 150 is "
                        "larger than the frames)")
    parser.add_argument("--peer-tiles", type=int, default=40,
                        help="DeepCAD-RT's train_datasets_size (patches per epoch)")
    parser.add_argument("--child", choices=("train", "test"), help=argparse.SUPPRESS)
    parser.add_argument("--package", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    args.package = _package_dir(args.deepcad_rt) if args.deepcad_rt else None
    if args.package is None:
        print(HOW, file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        files = simulate(work / "sim", SimulationConfig(frames=args.frames, size=(args.size,
                                                        args.size), photons=args.photons,
                                                        seed=0))
        data = work / "data"
        data.mkdir()
        shutil.copy(files.raw, data / "sim.tif")  # DeepCAD-RT trains on every file of a folder
        rec = convert(files.raw, work / "sim.zarr", workers=1, progress=False).path
        raw = tifffile.imread(files.raw)
        t = DEMO_TRAINING
        print(f"# machine: {machine()}")
        print(f"# simulation: {args.frames} frames of {args.size}² px, {args.photons:g} "
              f"photon/px/frame, seed 0. Ours: f = {t.features}, lr {t.lr:g} {t.schedule}, "
              f"loss {t.loss}, patch {','.join(map(str, t.patch))}, batch {t.batch_size}. "
              f"DeepCAD-RT: fmap {args.peer_fmap}, lr {args.peer_lr:g}, patch "
              f"{','.join(map(str, args.peer_patch))} (t,y,x), batch 1, "
              f"{args.peer_tiles} patches per epoch, output in the input's dtype (as "
              "published); ours float32.\n")
        print("| budget | method | training min | SNR dB | best Gaussian dB | "
              "− Gaussian dB | trace r (method / Gaussian) |")
        print("|---|---|---|---|---|---|---|")
        options = {k: v for k, v in t.model_dump().items()
                   if k not in ("epochs", "steps_per_epoch", "workers", "device")}
        for budget in args.budgets:
            last, steps, minutes = train_for(rec, work / f"ours{budget}", options, budget)
            mine = work / f"ours{budget}.tif"
            tifffile.imwrite(mine, denoise_in_memory(last, raw), photometric="minisblack")
            print(_row(budget, f"ours ({steps} steps)", minutes,
                       score(mine, files.clean, files.raw, footprints=files.truth)), flush=True)
            model, minutes = peer_train(args, data, work / f"peer{budget}", budget)
            theirs = work / f"peer{budget}.tif"
            tifffile.imwrite(theirs, peer_test(args, data, model, work / f"test{budget}"),
                             photometric="minisblack")
            print(_row(budget, f"DeepCAD-RT ({model.stem})", minutes,
                       score(theirs, files.clean, files.raw, footprints=files.truth)),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
