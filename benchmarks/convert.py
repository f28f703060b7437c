"""Conversion speed and memory against `cp` + `sync` and a naive serial loop.

Usage: python benchmarks/convert.py [--gib 4] [--size 512] [--dir DIR] [--workers N] [--keep]

Writes a BigTIFF of about GIB GiB (one uint16 page per frame), then, with the page cache
dropped before each (where the machine allows; the output says whether it did):
1. ``cp`` of the file followed by ``sync``;
2. ``deepcad-chunked convert`` (a LocalCluster, default chunks and compression), whole
   command, cluster start-up included; then the same with one worker, and with lz4;
3. a naive serial loop: tifffile reads 32 pages at a time and zarr writes them, one process.
Prints wall times, ratios to cp + sync, throughput and peak RSS of each process tree.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import drop_caches, machine, run_measured, write_big_tiff

NAIVE = textwrap.dedent("""
    import sys, numpy as np, tifffile, zarr
    from zarr.codecs import BloscCodec
    src, dst = sys.argv[1], sys.argv[2]
    with tifffile.TiffFile(src) as tif:
        s = tif.series[0]
        out = zarr.create_array(dst, shape=s.shape, chunks=(32, 128, 128), dtype=s.dtype,
                                compressors=BloscCodec(cname="zstd", clevel=1,
                                                       shuffle="bitshuffle"))
        for t in range(0, s.shape[0], 32):
            out[t:t + 32] = tif.asarray(key=range(t, min(t + 32, s.shape[0])))
""")


def main() -> None:
    """Run the three measurements side by side and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="size of the test TIFF")
    parser.add_argument("--size", type=int, default=512, help="frame edge in pixels")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (same disk)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    frames = int(args.gib * 2**30 / (args.size * args.size * 2))
    tif = work / "big.tif"
    print(f"# machine: {machine()}", flush=True)
    print(f"# writing {tif} ({frames} frames of {args.size}²)", flush=True)
    write_big_tiff(tif, frames, args.size, args.size)
    nbytes = tif.stat().st_size
    rows = []

    how = drop_caches([tif])
    cp = run_measured(["bash", "-c", f"cp '{tif}' '{work / 'copy.tif'}' && sync"])
    rows.append(("cp + sync", cp))
    (work / "copy.tif").unlink()

    base = [sys.executable, "-m", "deepcad_chunked.cli.main", "-q", "convert", str(tif), "-o",
            str(work / "ours.zarr"), "--no-progress"]
    variants = [("deepcad-chunked convert (+ sync)", ["--workers", str(args.workers)]
                 if args.workers else []),
                ("… with --workers 1", ["--workers", "1"]),
                ("… with --compression lz4", ["--compression", "lz4"])]
    stored = {}
    for name, extra in variants:
        how = drop_caches([tif])
        cmd = " ".join(f"'{c}'" for c in [*base, *extra])
        rows.append((name, run_measured(["bash", "-c", cmd + " && sync"])))
        stored[name] = sum(p.stat().st_size for p in (work / "ours.zarr").rglob("*")
                           if p.is_file())
        shutil.rmtree(work / "ours.zarr")

    drop_caches([tif])
    naive = run_measured(["bash", "-c", f"'{sys.executable}' -c '{NAIVE}' '{tif}' "
                          f"'{work / 'naive.zarr'}' && sync"])
    rows.append(("naive serial tifffile→zarr (+ sync)", naive))
    shutil.rmtree(work / "naive.zarr")

    print(f"\n# page cache: {how}; file {nbytes / 2**30:.2f} GiB; stored: " + ", ".join(
        f"{name.split('(')[0].strip()} {b / 2**30:.2f} GiB (ratio {nbytes / b:.2f})"
        for name, b in stored.items()) + "\n")
    print("| step | wall s | GiB/s | ÷ cp+sync | peak RSS MiB | exit |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m.seconds:.1f} | {nbytes / 2**30 / m.seconds:.2f} | "
              f"{m.seconds / cp.seconds:.2f} | {m.peak_rss_bytes / 2**20:.0f} | {m.returncode} |")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
