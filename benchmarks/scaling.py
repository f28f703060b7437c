"""Denoising throughput with 1 and 2 workers, on a LocalCluster and on SLURM jobs.

Usage: python benchmarks/scaling.py [--frames 256] [--size 128] [--features 4] [--rounds 2]

One recording, one network (random weights: the work, not the result, is measured), one
block size; each cluster gets a warm-up run (workers import torch and load the model), then
``--rounds`` timed runs of ``denoise`` (Zarr in → Zarr out; cluster start-up excluded), the
fastest kept. Every worker is single-threaded (one core). Efficiency with 2 workers =
t(1 worker) ÷ (2 · t(2 workers)). The SLURM rows need a controller (scripts/local-slurm.sh
start); its workers are jobs of 1 core and 4 GiB started by sbatch through dask-jobqueue.
The outputs of all runs are checked to be identical.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import torch
from _common import machine, noisy_frames
from distributed import Client, LocalCluster

from deepcad_chunked import ConvertConfig, DenoiseConfig, convert, denoise
from deepcad_chunked.model import Checkpoint
from deepcad_chunked.model.unet3d import UNet3D


@contextmanager
def local(workers: int) -> Iterator[Client]:
    with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


def slurm(workers: int, config: Path) -> AbstractContextManager[Client]:
    from deepcad_chunked.cluster import connect
    from deepcad_chunked.config import JobQueueOptions

    return connect("slurm", jobqueue=JobQueueOptions(jobs=workers, min_jobs=workers,
                                                     config_file=config, worker_wait=300))


def measure(name: str, start: Callable[[], AbstractContextManager[Client]], workers: int,
            store: Path, model: Path, work: Path, config: DenoiseConfig,
            rounds: int) -> tuple[float, Path]:
    with start() as client:
        client.wait_for_workers(workers, timeout=300)
        denoise(store, model, work / "warm.zarr", config=config, cluster=client,
                progress=False)
        shutil.rmtree(work / "warm.zarr")
        best = np.inf
        for r in range(rounds):
            out = work / f"{name}-{workers}-{r}.zarr"
            t0 = time.perf_counter()
            denoise(store, model, out, config=config, cluster=client, progress=False)
            best = min(best, time.perf_counter() - t0)
    print(f"  {name} × {workers}: {best:.1f} s", flush=True)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--block", default="64,64,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-slurm", action="store_true")
    args = parser.parse_args()
    block = tuple(int(v) for v in args.block.split(","))
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    try:
        raw = noisy_frames(args.frames, args.size, args.size)
        import tifffile

        tifffile.imwrite(work / "rec.tif", raw)
        torch.manual_seed(0)
        model = Checkpoint(model_state=UNet3D(features=args.features).state_dict(),
                           features=args.features,
                           normalization={"mean": float(raw.mean()), "std": float(raw.std())}
                           ).save(work / "model.pt")
        with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as lc, Client(lc) as c:
            store = convert(work / "rec.tif", work / "rec.zarr",
                            config=ConvertConfig(chunks=(32, 64, 64)), cluster=c,
                            progress=False).path
        config = DenoiseConfig(block=block, dtype="float32", device="cpu")
        kinds: list[tuple[str, Callable[[int], AbstractContextManager[Client]]]] = [
            ("LocalCluster", local)]
        if not args.no_slurm and shutil.which("sbatch"):
            yaml = work / "slurm.yaml"
            yaml.write_text(f"""jobqueue:
  slurm:
    cores: 1
    memory: 4GiB
    walltime: "01:00:00"
    log-directory: {work / "logs"}
    scheduler-options: {{host: 127.0.0.1, dashboard_address: "127.0.0.1:0"}}
""")
            kinds.append(("SLURM", lambda n: slurm(n, yaml)))
        rows, outputs = [], []
        for name, start in kinds:
            times = {}
            for n in (1, 2):
                times[n], out = measure(name, lambda s=start, n=n: s(n), n, store, model,
                                        work, config, args.rounds)
                outputs.append(out)
            rows.append((name, times[1], times[2], times[1] / (2 * times[2])))
        import zarr

        first = zarr.open_array(str(outputs[0] / "0"))[:]
        same = all(np.array_equal(first, zarr.open_array(str(o / "0"))[:]) for o in outputs)
        voxels = raw.size
        print(f"\nrecording {raw.shape} uint16, f = {args.features}, block {block}, halo 48, "
              f"outputs identical: {same}")
        print("\n| cluster | 1 worker s | 2 workers s | Mvoxel/s 1 → 2 | efficiency |")
        print("|---|---|---|---|---|")
        for name, t1, t2, eff in rows:
            print(f"| {name} | {t1:.1f} | {t2:.1f} | {voxels / t1 / 1e6:.2f} → "
                  f"{voxels / t2 / 1e6:.2f} | {eff:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
