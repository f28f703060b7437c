"""Simulate, convert, train, denoise on a LocalCluster, evaluate and plot, with the Python API.

Usage: python examples/denoise_simulated.py OUTDIR [--frames 600] [--size 96] [--steps 100]

Each step is one call; swap the simulation for your own TIFF files (``dc.convert("data/*.tif",
...)``) and drop the evaluation against ground truth, which only a simulation has.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distributed import Client, LocalCluster

import deepcad_chunked as dc


def main() -> None:
    """Run the steps and print the scores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--features", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    args.outdir.mkdir(exist_ok=True)
    side = min(64, args.size // 8 * 8)  # training tiles no larger than the frames

    # 1. a recording with ground truth (any length: written chunk by chunk)
    files = dc.simulate(args.outdir / "sim", dc.SimulationConfig(
        frames=args.frames, size=(args.size, args.size), photons=1.0), overwrite=True)

    # one cluster for the distributed steps; a scheduler address works the same way
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        # 2. TIFF → chunked OME-Zarr
        rec = dc.convert(files.raw, args.outdir / "raw.zarr", cluster=client, progress=False,
                         config=dc.ConvertConfig(overwrite=True))
        # 3. self-supervised training, streaming tiles from the store
        result = dc.train(rec.path, args.outdir / "model", resume=True, progress=False,
                          config=dc.TrainConfig(features=args.features, epochs=1,
                                                steps_per_epoch=args.steps, patch=(16, side, side)))
        # 4. seamless block-wise denoising on the cluster, written to Zarr as it goes
        out = dc.denoise(rec.path, result.best, args.outdir / "denoised.zarr", cluster=client,
                         progress=False, config=dc.DenoiseConfig(overwrite=True))
    # 5. scores against the ground truth, and a picture
    scores = dc.evaluate(out.path, files.clean, files.raw)
    for row in scores["rows"][:3]:
        logging.info("%-24s SNR %6.2f dB  trace r %.3f", row["name"], row["snr_db"],
                     row["trace_r_mean"])
    logging.info("SNR gain over raw: %+.2f dB", scores["gain_db"])
    logging.info("report: %s", dc.preview(files.raw, out.path, args.outdir / "report.png",
                                          footprints=files.truth))


if __name__ == "__main__":
    main()
