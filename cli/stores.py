"""The subcommands that read a store: ``info`` (what a store or source file holds, and
``--verify``), ``export`` (to TIFF, HDF5, NWB or a Suite2p plane) and ``export-onnx``."""

from __future__ import annotations

import argparse
import json
import logging

from deepcad_chunked.cli.options import EXIT_ERROR, add_axes_option, add_raw_options, raw_layout

from deepcad_chunked.errors import DeepCADError

log = logging.getLogger("deepcad_chunked.cli")


def add_store_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``info``, ``export`` and ``export-onnx`` to the command's subparsers."""
    _add_info(sub)
    _add_export(sub)
    _add_export_onnx(sub)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a recording store or source file",
                       description="Of a store: shape, axes, dtype, chunks, compression ratio, "
                       "frame rate, statistics, and whether it is complete. Of a source file "
                       "(TIFF, HDF5, NWB, Suite2p plane): what convert would read from it.")
    p.add_argument("path", metavar="PATH", help="OME-Zarr store, Zarr array or source file")
    add_axes_option(p)
    p.add_argument("--verify", action="store_true", help="read every chunk of a store and "
                   "list those that are missing or damaged (exit 1 if any)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_raw_options(p)
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.info import describe, is_source_file

    if is_source_file(args.path):
        if args.verify:
            raise DeepCADError(f"{args.path} is a source file; --verify checks a store")
        return _print_source(args)
    if args.verify:
        return _verify(args)
    info = describe(args.path, axes=args.axes)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    stats = info["statistics"] or {}
    ratio = info["compression_ratio"]
    rows = [
        ("path", info["path"]),
        ("complete", "yes" if info["complete"] else "NO (unfinished; rerun its command)"),
        ("format", f"Zarr v{info['zarr_format']}, " + (
            f"OME-NGFF {info['ngff_version']}" if info["ngff_version"] else "plain array")),
        ("written by", info["written_by"]),
        ("axes", "".join(info["axes"])),
        ("shape", " × ".join(map(str, info["shape"]))),
        ("dtype", info["dtype"]),
        ("chunks", " × ".join(map(str, info["chunks"]))),
        ("shards", " × ".join(map(str, info["shards"])) if info["shards"] else "none"),
        ("files", str(info["files"])),
        ("compressor", ", ".join(info["compressor"])),
        ("size", f"{info['raw_bytes'] / 2**20:.1f} MiB raw, {info['stored_bytes'] / 2**20:.1f}"
                 f" MiB stored" + (f" (ratio {ratio:.2f})" if ratio else "")),
        ("frame rate", f"{info['frame_rate_hz']:.4g} Hz" if info["frame_rate_hz"]
         else "unknown"),
        ("pixel size", f"{info['pixel_size_um'][0]:.4g} × {info['pixel_size_um'][1]:.4g} µm"
         if info["pixel_size_um"] else "unknown"),
    ]
    if stats:
        pct = stats.get("percentiles", {})
        rows += [
            ("mean ± std", f"{stats['mean']:.6g} ± {stats['std']:.6g}"),
            ("min … max", f"{stats['min']:.6g} … {stats['max']:.6g}"),
            ("percentiles", ", ".join(f"{k} {v:.6g}" for k, v in pct.items())),
        ]
    _print_rows(rows)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.info import verify_store

    report = verify_store(args.path, axes=args.axes)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for problem in report["damaged"]:
            print(f"frames {problem['frames']}: {problem['why']}")
        print(f"{report['path']}: {report['frames']} frames in {report['rows']} chunk rows "
              f"read; " + (f"{len(report['damaged'])} damaged" if report["damaged"]
                           else "every chunk is there and decodes"
                           + ("" if report["checksums"] else
                              " (this store has no checksums: changed bytes may go unseen)")))
    return EXIT_ERROR if report["damaged"] else 0


def _print_rows(rows: list[tuple[str, str]]) -> None:
    """``key  value`` lines, the values aligned."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _print_source(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.info import describe_source

    info = describe_source(args.path, raw_layout(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    origin = (info["origin"] or {}).get("nwb", {})
    rows = [
        ("path", str(info["path"])),
        ("source format", str(info["source_format"]) + (f" ({info['member']})"
                                                      if info["member"] else "")),
        ("files", ", ".join(info["files"])),
        ("axes", "".join(info["axes"])),
        ("shape", " × ".join(map(str, info["shape"]))),
        ("dtype", str(info["dtype"])),
        ("size", f"{info['raw_bytes'] / 2**20:.1f} MiB"),
        ("frame rate", f"{info['frame_rate_hz']:.4g} Hz" if info["frame_rate_hz"]
         else "unknown"),
        ("pixel size", "{:.4g} × {:.4g} µm".format(*info["pixel_size_um"])
         if info["pixel_size_um"] else "unknown"),
    ]
    if origin:
        plane, device = origin.get("imaging_plane", {}), origin.get("device", {})
        rows += [("session", str(origin.get("session", {}).get("session_description"))),
                 ("device", str(device.get("name"))),
                 ("imaging plane", f"{plane.get('name')}: {plane.get('indicator')} in "
                                   f"{plane.get('location')}")]
    _print_rows(rows)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a store to TIFF, HDF5, NWB or Suite2p",
                       description="Write a recording, out of core, to an OME-TIFF (BigTIFF, "
                       "one page per frame, dtype kept), an HDF5 dataset (OUT.h5[:/dataset], "
                       "default /data), a new NWB file (keeping the session, device and imaging "
                       "plane of an NWB source) or a Suite2p plane folder (data.bin + ops.npy, "
                       "int16). The format comes from the suffix, or --format.")
    p.add_argument("source", metavar="IN.zarr",
                   help="recording store: ours, an OME-Zarr image or a Zarr array")
    add_axes_option(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file to write (.tif, .h5, .nwb) or, with --format suite2p, a folder")
    p.add_argument("--format", choices=("tiff", "hdf5", "nwb", "suite2p"),
                   help="output format (default: from the output's suffix)")
    p.add_argument("--frame-rate", type=float, metavar="HZ",
                   help="frames per second written, overriding the store's (NWB needs one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from deepcad_chunked.jobs.export import export

    path = export(args.source, args.output, overwrite=args.overwrite,
                  progress=False if args.no_progress else None, axes=args.axes,
                  format=args.format, frame_rate=args.frame_rate)
    log.info("wrote %s", path)
    return 0


def _add_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="write a trained network as an ONNX graph",
                       description="Write the network of a checkpoint (ours or DeepCAD-RT's "
                       ".pth) as ONNX with dynamic n, t, y, x (multiples of 8), for ONNX "
                       "Runtime or TensorRT. Needs: pip install 'deepcad-chunked[onnx]'.")
    p.add_argument("model", metavar="MODEL", help="checkpoint (.pt) or DeepCAD-RT model (.pth)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    p.add_argument("--normalize", action="store_true",
                   help="build the normalisation in: the graph takes and returns raw values")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(run=_run_export_onnx)


def _run_export_onnx(args: argparse.Namespace) -> int:
    from deepcad_chunked.model.onnx_export import export_onnx

    export_onnx(args.model, args.output, normalize=args.normalize, opset=args.opset,
                overwrite=args.overwrite)
    return 0
