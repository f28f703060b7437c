"""Convert a folder of TIFF files into one OME-Zarr recording with the Python API.

Usage: python examples/convert_archive.py FOLDER OUT.zarr [--workers N]

The files are joined in natural sort order (``part_2`` before ``part_10``). The conversion
runs on a dask.distributed LocalCluster; pass ``cluster="tcp://host:8786"`` to use one that
is already running.
"""

from __future__ import annotations

import argparse
import logging

import deepcad_chunked as dc


def main() -> None:
    """Convert, then print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("output")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)

    config = dc.ConvertConfig(chunks=(32, 128, 128), overwrite=True)
    rec = dc.convert(args.folder, args.output, config=config, workers=args.workers,
                     progress=False)
    stats = rec.statistics
    logging.info("%s: shape %s, dtype %s, mean %.2f, std %.2f, 99th percentile %g",
                 rec.path, rec.shape, rec.dtype, stats["mean"], stats["std"],
                 stats["percentiles"]["p99"])
    lazy = rec.to_dask()  # a dask array over the store, for any further analysis
    logging.info("mean of the first 10 frames: %.2f", float(lazy[:10].mean().compute()))


if __name__ == "__main__":
    main()
