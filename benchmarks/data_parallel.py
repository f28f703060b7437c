"""Training steps per second in one process and in several (``train --devices N``) on this CPU.

Usage: python benchmarks/data_parallel.py [--devices 2] [--features 8] [--batch 4]
[--record]

On the demo's simulated recording, side by side, alternated twice:

- **same batch**: BATCH tiles per step in one process (torch on every core), then shared by
  DEVICES processes (cores ÷ DEVICES threads each): the same weights, to float rounding;
- **batch per process**: BATCH tiles per step in one process on cores ÷ DEVICES threads
  (one device's share of this machine), then BATCH tiles in each of DEVICES processes
  (DEVICES × BATCH per step): the per-process rate is the weak-scaling figure, the target
  being within 20 % of the lone process's.

A rate is ``(steps(160) − steps(40)) / (time(160) − time(40))``: two runs of each set-up,
so that process start-up, validation and checkpoints cancel out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import demo_recording, machine, publish

from deepcad_chunked import TrainConfig, train

SHORT, LONG = 40, 160


def _seconds(rec: Path, run: Path, config: TrainConfig, threads: int) -> float:
    """Wall seconds of one training run, torch limited to ``threads`` in a lone process."""
    shutil.rmtree(run, ignore_errors=True)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        train(rec, run, config=config, progress=False)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def main() -> None:
    """Measure and print one Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    n = args.devices
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    try:
        _, rec, _ = demo_recording(work, 1.0)
        base = {"features": args.features, "epochs": 1, "workers": 0, "device": "cpu",
                "val_tiles": 2, "calibrate": False, "patch": (16, 64, 64)}
        setups = {
            "same batch, 1 process": (TrainConfig(**base, batch_size=args.batch), cores),
            f"same batch, {n} processes": (TrainConfig(**base, batch_size=args.batch,
                                                        devices=n), cores),
            f"batch per process, 1 process on {max(1, cores // n)} core(s)": (
                TrainConfig(**base, batch_size=args.batch), max(1, cores // n)),
            f"batch per process, {n} processes": (
                TrainConfig(**base, batch_size=args.batch * n, devices=n), cores),
        }
        rates: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(2):
            for name, (config, threads) in setups.items():
                took = [_seconds(rec, work / "run", config.model_copy(
                    update={"steps_per_epoch": steps}), threads) for steps in (SHORT, LONG)]
                rates[name].append((LONG - SHORT) / (took[1] - took[0]))
                print(name, rates[name][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = {name: float(np.median(r)) for name, r in rates.items()}
    names = list(setups)
    lines = [f"machine: {machine()}; demo recording (1200 frames of 128²), f = {args.features}, "
             f"patch 16,64,64, torch CPU, gloo; medians of 2 alternated measurements", "",
             "| set-up | tiles per step | steps/s | tiles/s | tiles/s ÷ 1 process | "
             "tiles/s per process ÷ 1 process |", "|---|---|---|---|---|---|"]
    for i, name in enumerate(names):
        config = setups[name][0]
        lone = rate[names[i - i % 2]] * setups[names[i - i % 2]][0].batch_size
        tiles = rate[name] * config.batch_size
        lines.append(f"| {name} | {config.batch_size} | {rate[name]:.2f} | {tiles:.1f} | "
                     f"{tiles / lone:.2f} | {tiles / config.devices / lone:.2f} |")
    publish("Data-parallel training on the CPU", "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
