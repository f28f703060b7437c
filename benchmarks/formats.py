"""Converting from, and exporting to, every format: speed and memory side by side.

Usage: python benchmarks/formats.py [--mib 1024] [--size 512] [--dir DIR] [--record]

Writes the same uint16 frames (photon-limited two-photon-like, :func:`_common.noisy_frames`)
as a BigTIFF, an HDF5 dataset (contiguous; chunked + gzip level 1; chunked + Blosc LZ4 through
hdf5plugin), an NWB TwoPhotonSeries, a raw binary file and a Suite2p plane (int16), then for
each, with the page cache dropped first: ``deepcad-chunked convert SRC -o OUT.zarr`` (local
cluster, default chunks and shards), wall time, MB/s of samples and the peak memory of the
command's whole process tree. The stores are checked to hold the same samples (a digest of
every sample, equal to the TIFF's; Suite2p's are int16 of the same values). Then the TIFF's store
is exported to each format (``export``): wall time and MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from _common import drop_caches, machine, noisy_frames, publish, run_measured, write_big_tiff

from deepcad_chunked import open_recording
from deepcad_chunked.store.omezarr import read_slabs

POOL = 256


def _frames(frames: int, height: int, width: int) -> Iterator[np.ndarray]:
    stack = noisy_frames(POOL, height, width)
    for t in range(frames):
        yield stack[t % POOL]


def _write_sources(folder: Path, frames: int, size: int) -> dict[str, tuple[str, list[str]]]:
    """Every source: name → (what to convert, extra convert options)."""
    import h5py
    import hdf5plugin
    from hdmf.backends.hdf5.h5_utils import H5DataIO
    from hdmf.data_utils import DataChunkIterator

    shape = (frames, size, size)
    write_big_tiff(folder / "rec.tif", frames, size, size, pool=POOL)
    chunk = (16, size, size)
    with h5py.File(folder / "rec.h5", "w") as f:
        plain = f.create_dataset("contiguous", shape=shape, dtype=np.uint16)
        gzip = f.create_dataset("gzip", shape=shape, dtype=np.uint16, chunks=chunk,
                                compression="gzip", compression_opts=1)
        lz4 = f.create_dataset("blosc_lz4", shape=shape, dtype=np.uint16, chunks=chunk,
                               **hdf5plugin.Blosc(cname="lz4", clevel=5,
                                                  shuffle=hdf5plugin.Blosc.BITSHUFFLE))
        for t0 in range(0, frames, POOL):
            block = np.stack(list(_frames(min(POOL, frames - t0), size, size)))
            for ds in (plain, gzip, lz4):
                ds[t0:t0 + len(block)] = block
    with open(folder / "rec.raw", "wb") as fh:
        for frame in _frames(frames, size, size):
            fh.write(frame.tobytes())
    plane = folder / "suite2p" / "plane0"
    plane.mkdir(parents=True)
    with open(plane / "data.bin", "wb") as fh:
        for frame in _frames(frames, size, size):
            fh.write(frame.astype(np.int16).tobytes())
    np.save(plane / "ops.npy", {"Ly": size, "Lx": size, "nframes": frames, "fs": 30.0})
    _write_nwb(folder / "rec.nwb", frames, size,
               H5DataIO(DataChunkIterator(data=(f.T for f in _frames(frames, size, size)),
                                          maxshape=(frames, size, size), dtype=np.dtype(np.uint16),
                                          buffer_size=16), chunks=chunk))
    return {
        "TIFF (BigTIFF)": (str(folder / "rec.tif"), ["--frame-rate", "30"]),
        "HDF5 contiguous": (f"{folder / 'rec.h5'}:/contiguous", []),
        "HDF5 gzip-1": (f"{folder / 'rec.h5'}:/gzip", []),
        "HDF5 Blosc LZ4": (f"{folder / 'rec.h5'}:/blosc_lz4", []),
        "NWB": (str(folder / "rec.nwb"), []),
        "raw binary": (str(folder / "rec.raw"), ["--raw-shape", f"auto,{size},{size}"]),
        "Suite2p int16": (str(plane), []),
    }


def _write_nwb(path: Path, frames: int, size: int, data: object) -> None:
    import datetime as dt

    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ophys import ImagingPlane, OpticalChannel, TwoPhotonSeries

    nwbfile = NWBFile(session_description="benchmark", identifier="benchmark",
                      session_start_time=dt.datetime.now(dt.timezone.utc))
    device = nwbfile.create_device(name="scope")
    plane = ImagingPlane(name="plane", optical_channel=OpticalChannel(
        name="green", description="", emission_lambda=510.0), description="", device=device,
        excitation_lambda=920.0, imaging_rate=30.0, indicator="GCaMP", location="V1")
    nwbfile.add_imaging_plane(plane)
    nwbfile.add_acquisition(TwoPhotonSeries(name="TwoPhotonSeries", data=data,
                                            imaging_plane=plane, rate=30.0, unit="n.a."))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)


def _digest(store: Path) -> str:
    """SHA-256 of a store's samples as uint16 (Suite2p's int16 hold the same values)."""
    rec = open_recording(store)
    h = hashlib.sha256()
    for slab in read_slabs(rec.array, rec.chunks[0]):
        h.update(slab.astype(np.uint16).tobytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=1024, help="recording size (MiB)")
    parser.add_argument("--size", type=int, default=512, help="frame side (pixels)")
    parser.add_argument("--dir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    frames = int(args.mib * 2**20 // (args.size * args.size * 2))
    mb = frames * args.size * args.size * 2 / 1e6
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="formats-"))
    cli = [sys.executable, "-m", "deepcad_chunked.cli.main"]
    try:
        sources = _write_sources(root, frames, args.size)
        rows = ["| source | convert s | MB/s | peak memory MiB | same samples |",
                "|---|---|---|---|---|"]
        reference = None
        for name, (source, extra) in sources.items():
            out = root / f"{abs(hash(name))}.zarr"
            drop_caches([root])
            run = run_measured([*cli, "convert", source, "-o", str(out), "--no-progress",
                                *extra], stderr=sys.stderr)
            if run.returncode:
                raise SystemExit(f"convert of {name} failed")
            digest = _digest(out)
            reference = reference or digest
            same = digest == reference
            rows.append(f"| {name} | {run.seconds:.1f} | {mb / run.seconds:.0f} | "
                        f"{run.peak_rss_bytes / 2**20:.0f} | {'yes' if same else 'NO'} |")
            if name != "TIFF (BigTIFF)":
                shutil.rmtree(out)
            else:
                tiff_store = out
        rows += ["", "| export to | s | MB/s |", "|---|---|---|"]
        for name, target, extra in (("OME-TIFF", "out.tif", []), ("HDF5", "out.h5", []),
                                    ("NWB", "out.nwb", []),
                                    ("Suite2p", "plane", ["--format", "suite2p"])):
            drop_caches([root])
            run = run_measured([*cli, "export", str(tiff_store), "-o", str(root / target),
                                "--no-progress", *extra], stderr=sys.stderr)
            if run.returncode:
                raise SystemExit(f"export to {name} failed")
            rows.append(f"| {name} | {run.seconds:.1f} | {mb / run.seconds:.0f} |")
        text = (f"{machine()}\n\n{frames} frames of {args.size}² uint16 ({mb:.0f} MB of "
                "samples); convert on the default local cluster.\n\n" + "\n".join(rows))
        publish("Formats: converting from and exporting to each (issue 16)", text, args.record)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
