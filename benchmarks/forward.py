"""One forward pass of the network on the CPU: peak memory per input voxel and time.

Side by side, each in a fresh process (peak RSS above what the process held before the pass):
the module's own forward (``UNet3D.forward``, what inference used before the lean pass), the
lean pass (:mod:`deepcad_chunked.infer.lean`) on contiguous tensors, the lean pass
channels-last, and the same in a process with the allocator settings of an inference worker
(:data:`~deepcad_chunked.cluster.INFERENCE_MALLOC_ENV`) — what ``denoise`` runs on the CPU.
fp32, one volume, ``torch`` with the threads of the machine; the best time of ``--repeats``
passes, the peak memory after all of them (so with the heap's fragmentation). Appends the
table to benchmarks/RESULTS.md with ``--record``.

    python benchmarks/forward.py [--shape 64,160,160] [--features 4 8 16] [--modes ...]
        [--repeats 2] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import machine, publish

from deepcad_chunked.cluster import INFERENCE_MALLOC_ENV

MODES = ("module", "lean", "lean channels-last", "inference worker")


def _child(mode: str, features: int, shape: tuple[int, int, int], repeats: int) -> dict:
    import torch

    from deepcad_chunked.infer.lean import lean_forward
    from deepcad_chunked.model.unet3d import UNet3D

    torch.manual_seed(0)
    model = UNet3D(features=features).eval()
    layout = (torch.channels_last_3d if mode in ("lean channels-last", "inference worker")
              else torch.contiguous_format)
    model = model.to(memory_format=layout)
    x = torch.randn(1, 1, *shape).contiguous(memory_format=layout)
    run = (lambda v: model(v)) if mode == "module" else (lambda v: lean_forward(model, v))
    with torch.no_grad():
        run(torch.randn(1, 1, 16, 16, 16).contiguous(memory_format=layout))  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run(x)
            times.append(time.perf_counter() - start)
            del out
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    voxels = x.numel()
    return {"mode": mode, "features": features, "bytes_per_voxel": (peak - before) * 1024 / voxels,
            "seconds": min(times), "mvoxels_per_s": voxels / min(times) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,160,160", help="input t,y,x (multiples of 8)")
    parser.add_argument("--features", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "F", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, features, shape = args.child
        print(json.dumps(_child(mode, int(features), tuple(map(int, shape.split(","))),
                                args.repeats)))
        return
    rows = []
    for features in args.features:
        for mode in args.modes:
            env = {**os.environ, **({k: str(v) for k, v in INFERENCE_MALLOC_ENV.items()}
                                    if mode == "inference worker" else {})}
            out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats),
                                  "--child", mode, str(features), args.shape],
                                 capture_output=True, text=True, check=True, env=env).stdout
            rows.append(json.loads(out))
            print(rows[-1], flush=True)
    lines = [f"{machine()}; input {args.shape.replace(',', '×')}, fp32, best of "
             f"{args.repeats}, each mode in a fresh process.", "",
             f"| f | forward | peak B/voxel | s | Mvoxel/s | time ÷ {args.modes[0]}'s |",
             "|---|---|---|---|---|---|"]
    for features in args.features:
        base = next(r for r in rows if r["features"] == features)
        for r in (r for r in rows if r["features"] == features):
            lines.append(f"| {features} | {r['mode']} | {r['bytes_per_voxel']:.0f} | "
                         f"{r['seconds']:.2f} | {r['mvoxels_per_s']:.2f} | "
                         f"{r['seconds'] / base['seconds']:.2f} |")
    publish("Forward pass on the CPU", "\n".join(lines), args.record)

if __name__ == "__main__":
    main()
