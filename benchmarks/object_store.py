"""Convert and denoise against an S3 API server on loopback, beside an s3fs copy of the same bytes.

Usage: python benchmarks/object_store.py [--mib 256] [--size 256] [--features 4] [--record]

Starts moto's S3 server on 127.0.0.1 — a Python server whose own speed bounds every request,
so each command on ``s3://`` is compared with what the same server takes to receive the same
bytes from ``s3fs`` (``put`` of the local result's files), not with a real bucket. Writes a
TIFF of about MIB MiB (uint16 frames of SIZE²), then, one after the other:

1. ``convert`` TIFF → local store, ``convert`` TIFF → ``s3://``, and an s3fs copy of the
   local store's files to the server;
2. ``denoise`` local → local and ``s3://`` → ``s3://`` with a FEATURES-feature network of
   random weights (the network's time is the same in both), and the s3fs transfers of the
   same bytes: a ``get`` of the input store and a ``put`` of the local result.

Every command is a whole ``deepcad-chunked`` process (cluster start included). The s3 results
are checked to be byte-identical to the local ones.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import s3fs
from _common import machine, publish, random_model, s3_bucket, s3_server, write_big_tiff


def _timed(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deepcad_chunked.cli.main", "-q", *args,
                    "--no-progress"], check=True)
    return time.perf_counter() - start


def _put(fs: s3fs.S3FileSystem, local: Path, key: str) -> float:
    start = time.perf_counter()
    fs.put(str(local), key, recursive=True)
    return time.perf_counter() - start


def _get(fs: s3fs.S3FileSystem, key: str, local: Path) -> float:
    start = time.perf_counter()
    fs.get(key, str(local), recursive=True)
    return time.perf_counter() - start


def _same(fs: s3fs.S3FileSystem, local: Path, key: str) -> bool:
    files = {p.relative_to(local).as_posix(): p.read_bytes()
             for p in (local / "0").rglob("*") if p.is_file()}
    objects = fs.cat(fs.find(f"{key}/0"))
    return {k[len(key) + 1:]: v for k, v in objects.items()} == files


def main() -> None:
    """Run the measurements side by side and print one Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=256.0, help="size of the test TIFF")
    parser.add_argument("--size", type=int, default=256, help="frame edge in pixels")
    parser.add_argument("--features", type=int, default=4, help="feature maps of the network")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server, endpoint = s3_server()
    try:
        fs = s3_bucket(endpoint)
        frames = int(args.mib * 2**20 / (args.size * args.size * 2))
        tif = write_big_tiff(work / "rec.tif", frames, args.size, args.size)
        model = random_model(work / "m.pt", args.features)
        rows = []
        local_conv = _timed("convert", str(tif), "-o", str(work / "rec.zarr"))
        s3_conv = _timed("convert", str(tif), "-o", "s3://bench/rec.zarr")
        copy_conv = _put(fs, work / "rec.zarr", "bench/copy.zarr")
        stored = sum(p.stat().st_size for p in (work / "rec.zarr").rglob("*") if p.is_file())
        rows.append(("convert", local_conv, s3_conv, copy_conv, stored,
                     _same(fs, work / "rec.zarr", "bench/rec.zarr")))
        local_dn = _timed("denoise", str(work / "rec.zarr"), "-m", str(model), "-o",
                          str(work / "dn.zarr"))
        s3_dn = _timed("denoise", "s3://bench/rec.zarr", "-m", str(model), "-o",
                       "s3://bench/dn.zarr")
        copy_dn = (_get(fs, "bench/rec.zarr", work / "fetched.zarr")
                   + _put(fs, work / "dn.zarr", "bench/copy-dn.zarr"))
        stored_dn = stored + sum(p.stat().st_size for p in (work / "dn.zarr").rglob("*")
                                 if p.is_file())
        rows.append((f"denoise (f = {args.features})", local_dn, s3_dn, copy_dn, stored_dn,
                     _same(fs, work / "dn.zarr", "bench/dn.zarr")))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"machine: {machine()}; {frames} frames of {args.size}² uint16 "
             f"({frames * args.size**2 * 2 / 2**20:.0f} MiB raw); S3: moto's server on "
             "127.0.0.1 (one Python process)", "",
             "| command | local s | s3 s | s3fs transfer of the same bytes s | MB moved | "
             "s3 − local s | (s3 − local) ÷ copy | s3 bytes = local |",
             "|---|---|---|---|---|---|---|---|"]
    for name, local, remote, copy, nbytes, same in rows:
        lines.append(f"| {name} | {local:.1f} | {remote:.1f} | {copy:.1f} | {nbytes / 1e6:.0f} "
                     f"| {remote - local:.1f} | {(remote - local) / copy:.2f} | "
                     f"{'yes' if same else 'NO'} |")
    publish("Object store (loopback S3)", "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
