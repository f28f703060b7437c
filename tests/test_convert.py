"""TIFF → OME-Zarr conversion through the library API on a real LocalCluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr
from distributed import Client

from deepcad_chunked import ConvertConfig, convert, export, info, open_recording
from deepcad_chunked.errors import (
    IncompleteStoreError,
    OutputExistsError,
    SourceError,
    StoreError,
)
from deepcad_chunked.store.omezarr import update_attrs
from tests.tiffs import (
    movie,
    write_imagej,
    write_ome,
    write_pages,
    write_plain,
    write_scanimage,
    write_series,
)


def _convert(src, out: Path, client: Client, **config) -> object:
    return convert(src, out, config=ConvertConfig(**config), cluster=client, progress=False)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32", "int32"])
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_is_bit_exact(tmp_path: Path, client: Client, dtype: str,
                                 zarr_format: int) -> None:
    data = movie((45, 37, 53), dtype)
    src = write_plain(tmp_path / "a.tif", data, bigtiff=dtype == "float32")
    rec = _convert(src, tmp_path / "a.zarr", client, chunks=(8, 16, 32), zarr_format=zarr_format)
    assert rec.dtype == data.dtype and rec.shape == data.shape
    assert rec.chunks == (8, 16, 32) and rec.zarr_format == zarr_format
    stored = zarr.open_array(str(tmp_path / "a.zarr" / "0"), mode="r")[:]
    assert stored.dtype == data.dtype
    assert stored.tobytes() == data.tobytes()


def test_statistics_match_numpy(tmp_path: Path, client: Client) -> None:
    data = movie((40, 20, 30), "uint16")
    rec = _convert(write_plain(tmp_path / "s.tif", data), tmp_path / "s.zarr", client,
                   chunks=(7, 20, 30))
    stats = rec.statistics
    assert stats["mean"] == pytest.approx(data.mean(dtype=np.float64), rel=1e-12)
    assert stats["std"] == pytest.approx(data.std(dtype=np.float64), rel=1e-12)
    assert (stats["min"], stats["max"]) == (data.min(), data.max())
    assert stats["percentiles"]["p99"] == np.percentile(data, 99, method="inverted_cdf")


def test_multi_file_series_in_natural_order_with_short_last_file(tmp_path: Path,
                                                                 client: Client) -> None:
    data = movie((107, 19, 23), "int16")
    paths = write_series(tmp_path / "parts", data, per_file=10)  # rec_1 … rec_11 (7 frames)
    assert len(paths) == 11 and tifffile.imread(paths[-1]).shape[0] == 7
    rec = _convert(tmp_path / "parts", tmp_path / "m.zarr", client, chunks=(16, 19, 23))
    np.testing.assert_array_equal(rec.array[:], data)
    sources = rec.attrs["provenance"]["sources"]
    assert [Path(s["path"]).name for s in sources][:3] == ["rec_1.tif", "rec_2.tif", "rec_3.tif"]
    assert sources[-1]["frames"] == 7 and sources[0]["bytes"] == paths[0].stat().st_size


def test_glob_source(tmp_path: Path, client: Client) -> None:
    data = movie((30, 8, 9), "uint16")
    write_series(tmp_path, data, per_file=4, stem="g_")
    rec = _convert(str(tmp_path / "g_*.tif"), tmp_path / "g.zarr", client)
    np.testing.assert_array_equal(rec.array[:], data)


def test_imagej_hyperstack_keeps_c_and_z(tmp_path: Path, client: Client) -> None:
    data = movie((6, 3, 2, 11, 13), "uint16")  # TZCYX
    path = write_imagej(tmp_path / "h.tif", data, finterval=0.5, spacing=3.0, unit="um")
    rec = _convert(path, tmp_path / "h.zarr", client)
    assert rec.axes == ("t", "c", "z", "y", "x")
    assert rec.chunks[1:3] == (1, 1)
    np.testing.assert_array_equal(rec.array[:], data.transpose(0, 2, 1, 3, 4))
    scale = rec.ome["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[0] == pytest.approx(0.5) and scale[2] == pytest.approx(3.0)


def test_ome_tiff_scales_reach_ngff(tmp_path: Path, client: Client) -> None:
    data = movie((9, 16, 12), "uint16")
    path = write_ome(tmp_path / "o.ome.tif", data, TimeIncrement=0.1, TimeIncrementUnit="s",
                     PhysicalSizeX=1.5, PhysicalSizeXUnit="µm", PhysicalSizeY=1.5,
                     PhysicalSizeYUnit="µm")
    rec = _convert(path, tmp_path / "o.zarr", client)
    axes = {a["name"]: a for a in rec.ome["axes"]}
    assert axes["t"]["unit"] == "second" and axes["x"]["unit"] == "micrometer"
    assert rec.ome["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx(
        [0.1, 1.5, 1.5])
    assert rec.attrs["frame_rate_hz"] == pytest.approx(10.0)


def test_scanimage_volumes(tmp_path: Path, client: Client) -> None:
    vol = movie((8, 2, 3, 10, 12), "int16")
    rec = _convert(write_scanimage(tmp_path / "si.tif", vol, frame_rate=30.0),
                   tmp_path / "si.zarr", client)
    assert rec.axes == ("t", "c", "z", "y", "x")
    np.testing.assert_array_equal(rec.array[:], vol)
    assert rec.frame_interval_s == pytest.approx(3 / 30.0)


def test_frame_rate_option_overrides_metadata(tmp_path: Path, client: Client) -> None:
    path = write_imagej(tmp_path / "f.tif", movie((5, 8, 8), "uint16"), axes="TYX", finterval=1.0)
    rec = _convert(path, tmp_path / "f.zarr", client, frame_rate=20.0)
    assert rec.frame_interval_s == pytest.approx(0.05)
    assert rec.ome["axes"][0] == {"name": "t", "type": "time", "unit": "second"}


def test_unknown_scales_have_no_units(tmp_path: Path, client: Client) -> None:
    rec = _convert(write_pages(tmp_path / "p.tif", movie((4, 8, 8), "uint8")),
                   tmp_path / "p.zarr", client)
    assert all("unit" not in a for a in rec.ome["axes"])
    assert rec.ome["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_opens_with_xarray_and_ome_zarr(tmp_path: Path, client: Client, zarr_format: int) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = movie((12, 10, 14), "uint16")
    _convert(write_plain(tmp_path / "x.tif", data), tmp_path / "x.zarr", client,
             zarr_format=zarr_format, frame_rate=5.0)
    ds = xr.open_zarr(tmp_path / "x.zarr", consolidated=False, zarr_format=zarr_format)
    assert ds["0"].dims == ("t", "y", "x")
    np.testing.assert_array_equal(ds["0"].values, data)
    nodes = list(Reader(parse_url(str(tmp_path / "x.zarr")))())
    assert [a["name"] for a in nodes[0].metadata["axes"]] == ["t", "y", "x"]
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), data)
    if zarr_format == 2:
        attrs = json.loads((tmp_path / "x.zarr" / ".zattrs").read_text())
        assert attrs["multiscales"][0]["version"] == "0.4"
    else:
        meta = json.loads((tmp_path / "x.zarr" / "zarr.json").read_text())
        assert meta["attributes"]["ome"]["version"] == "0.5"


def test_existing_output_is_not_overwritten_without_permission(tmp_path: Path,
                                                               client: Client) -> None:
    src = write_plain(tmp_path / "a.tif", movie((6, 8, 8), "uint16"))
    other = write_plain(tmp_path / "b.tif", movie((6, 8, 8), "uint16", seed=9))
    _convert(src, tmp_path / "o.zarr", client)
    before = zarr.open_array(str(tmp_path / "o.zarr" / "0"))[:]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _convert(other, tmp_path / "o.zarr", client)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr" / "0"))[:], before)
    rec = _convert(other, tmp_path / "o.zarr", client, overwrite=True)
    np.testing.assert_array_equal(rec.array[:], tifffile.imread(other))


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tmp_path: Path,
                                                              client: Client) -> None:
    src = write_plain(tmp_path / "a.tif", movie((6, 8, 8), "uint16"))
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not a Zarr store"):
        _convert(src, precious, client, overwrite=True)
    assert (precious / "chapter1.tex").read_text() == "years of work"


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_mismatched_files_are_refused_before_writing(tmp_path: Path, client: Client,
                                                     bad: str) -> None:
    write_plain(tmp_path / "s_1.tif", movie((5, 8, 8), "uint16"))
    second = movie((5, 8, 9), "uint16") if bad == "shape" else movie((5, 8, 8), "int16")
    write_plain(tmp_path / "s_2.tif", second)
    with pytest.raises(SourceError, match=r"s_2\.tif"):
        _convert(tmp_path, tmp_path / "out.zarr", client)
    assert not (tmp_path / "out.zarr").exists()


def test_single_frame_is_refused(tmp_path: Path, client: Client) -> None:
    with pytest.raises(SourceError, match="at least 2"):
        _convert(write_plain(tmp_path / "one.tif", movie((1, 8, 8), "uint16")),
                 tmp_path / "one.zarr", client)
    assert not (tmp_path / "one.zarr").exists()


def test_readers_refuse_incomplete_and_foreign_stores(tmp_path: Path, client: Client) -> None:
    _convert(write_plain(tmp_path / "a.tif", movie((6, 8, 8), "uint16")), tmp_path / "a.zarr",
             client)
    update_attrs(tmp_path / "a.zarr", complete=False)
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_recording(tmp_path / "a.zarr")
    with pytest.raises(IncompleteStoreError):
        export(tmp_path / "a.zarr", tmp_path / "a.tif.out")
    assert info(tmp_path / "a.zarr")["complete"] is False
    zarr.create_group(str(tmp_path / "foreign.zarr")).create_array("0", shape=(2, 2), dtype="u1")
    with pytest.raises(StoreError, match="neither a deepcad-chunked recording nor an OME"):
        open_recording(tmp_path / "foreign.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        open_recording(tmp_path / "nothing.zarr")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_export_round_trip(tmp_path: Path, client: Client, zarr_format: int) -> None:
    data = movie((21, 13, 17), "int16")
    path = write_ome(tmp_path / "in.ome.tif", data, TimeIncrement=0.05, TimeIncrementUnit="s",
                     PhysicalSizeX=0.5, PhysicalSizeXUnit="µm", PhysicalSizeY=0.5,
                     PhysicalSizeYUnit="µm")
    _convert(path, tmp_path / "r.zarr", client, chunks=(4, 13, 17), zarr_format=zarr_format)
    out = export(tmp_path / "r.zarr", tmp_path / "out.tif", progress=False)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and tif.is_ome and len(tif.pages) == 21
        np.testing.assert_array_equal(tif.asarray(), data)
    again = _convert(out, tmp_path / "again.zarr", client)
    assert again.frame_interval_s == pytest.approx(0.05)
    assert again.attrs["pixel_size_um"] == pytest.approx([0.5, 0.5])
    with pytest.raises(OutputExistsError):
        export(tmp_path / "r.zarr", out)


def test_export_keeps_planes_and_channels(tmp_path: Path, client: Client) -> None:
    data = movie((4, 3, 2, 9, 10), "uint16")
    _convert(write_imagej(tmp_path / "h.tif", data), tmp_path / "h.zarr", client)
    out = export(tmp_path / "h.zarr", tmp_path / "h_out.tif", progress=False)
    again = _convert(out, tmp_path / "h2.zarr", client)
    assert again.axes == ("t", "c", "z", "y", "x")
    np.testing.assert_array_equal(again.array[:], data.transpose(0, 2, 1, 3, 4))


def test_full_disk_leaves_an_incomplete_store(tmp_path: Path, client: Client,
                                              small_fs: Path) -> None:
    data = np.random.default_rng(0).integers(0, 65535, size=(64, 64, 64), dtype=np.uint16)
    src = write_plain(tmp_path / "big.tif", data)  # 512 KiB of noise: more than 256 KiB free
    with pytest.raises(StoreError, match=r"no space left on its device.*rerun"):
        _convert(src, small_fs / "out.zarr", client, chunks=(8, 64, 64))
    with pytest.raises(IncompleteStoreError):
        open_recording(small_fs / "out.zarr")
