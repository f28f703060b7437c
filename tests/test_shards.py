"""Sharded Zarr v3 stores: one file per shard, whole shards per task, readable by other tools."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client

from deepcad_chunked import ConvertConfig, DenoiseConfig, convert, denoise
from deepcad_chunked.config import SHARD_BYTES
from deepcad_chunked.errors import ConfigError
from deepcad_chunked.jobs.convert import MIN_SLABS, resolve_shards
from tests.conftest import assert_clean_error, run_cli
from tests.tiffs import movie, write_plain


def _files(store: Path) -> list[Path]:
    return [p for p in (store / "0" / "c").rglob("*") if p.is_file()]


def test_auto_shards_hold_whole_frames_and_about_the_target_bytes() -> None:
    long = resolve_shards("auto", (32, 128, 128), (20_000, 512, 512), 2, 3)
    assert long is not None and long[1:] == (512, 512)
    shard_bytes = math.prod(long) * 2
    assert SHARD_BYTES / 2 < shard_bytes <= SHARD_BYTES
    wide = resolve_shards("auto", (32, 128, 128), (5_000, 2048, 2048), 2, 3)
    assert wide is not None and wide[1:] == (1024, 1024)  # several shards per frame
    short = resolve_shards("auto", (32, 128, 128), (400, 512, 512), 2, 3)
    assert short is not None and math.ceil(400 / short[0]) >= MIN_SLABS
    planes = resolve_shards("auto", (32, 1, 64, 64), (900, 3, 100, 100), 2, 3)
    assert planes is not None and planes[1:] == (1, 128, 128)
    assert resolve_shards("auto", (32, 128, 128), (400, 512, 512), 2, 2) is None
    assert resolve_shards("none", (32, 128, 128), (400, 512, 512), 2, 3) is None
    assert resolve_shards((64, 512, 512), (32, 128, 128), (100, 200, 300), 2, 3) \
        == (64, 256, 384)  # clipped to the recording, in whole chunks
    with pytest.raises(ConfigError, match="multiple of the chunk"):
        resolve_shards((48, 128, 128), (32, 128, 128), (100, 200, 300), 2, 3)


def test_sharded_store_has_one_file_per_shard_and_the_same_bytes(tmp_path: Path,
                                                                 client: Client) -> None:
    data = movie((50, 40, 44), "uint16")
    src = write_plain(tmp_path / "a.tif", data)
    sharded = convert(src, tmp_path / "s.zarr", config=ConvertConfig(
        chunks=(4, 16, 16), shards=(12, 32, 48)), cluster=client, progress=False)
    plain = convert(src, tmp_path / "u.zarr", config=ConvertConfig(
        chunks=(4, 16, 16), shards="none"), cluster=client, progress=False)
    assert sharded.shards == (12, 32, 48) and sharded.chunks == (4, 16, 16)
    assert plain.shards is None
    assert len(_files(tmp_path / "s.zarr")) == math.ceil(50 / 12) * 2 * 1
    assert len(_files(tmp_path / "u.zarr")) == math.ceil(50 / 4) * 3 * 3
    assert sharded.array[:].tobytes() == data.tobytes() == plain.array[:].tobytes()
    assert sharded.statistics == plain.statistics


def test_other_readers_open_a_sharded_store(tmp_path: Path, client: Client) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = movie((40, 24, 20), "uint16")
    convert(write_plain(tmp_path / "a.tif", data), tmp_path / "a.zarr",
            config=ConvertConfig(chunks=(4, 8, 8), shards=(16, 24, 24)), cluster=client,
            progress=False)
    assert len(_files(tmp_path / "a.zarr")) == 3  # several chunks in each file
    ds = xr.open_zarr(tmp_path / "a.zarr", consolidated=False, zarr_format=3)
    np.testing.assert_array_equal(ds["0"].values, data)
    nodes = list(Reader(parse_url(str(tmp_path / "a.zarr")))())
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), data)
    array = zarr.open_array(str(tmp_path / "a.zarr" / "0"), mode="r")
    np.testing.assert_array_equal(array[5:30, 3:19, 7:11], data[5:30, 3:19, 7:11])


def test_denoised_store_is_sharded_by_block_and_equals_the_unsharded_one(
        tmp_path: Path, client: Client, tiny_model: Path) -> None:
    data = movie((40, 32, 32), "uint16")
    src = write_plain(tmp_path / "a.tif", data)
    runs = {}
    for name, shards in (("s", (8, 32, 32)), ("u", "none")):
        rec = convert(src, tmp_path / f"{name}.zarr", config=ConvertConfig(
            chunks=(8, 16, 16), shards=shards), cluster=client, progress=False)
        runs[name] = denoise(rec.path, tiny_model, tmp_path / f"{name}-dn.zarr",
                             config=DenoiseConfig(block=(16, 16, 16), halo=8),
                             cluster=client, progress=False)
    assert runs["s"].shards == (16, 16, 16) and runs["s"].chunks == (8, 16, 16)
    assert len(_files(runs["s"].path)) == 3 * 2 * 2  # one file per block
    assert runs["u"].shards is None
    assert runs["s"].array[:].tobytes() == runs["u"].array[:].tobytes()


def test_bad_shard_options_are_one_line_errors(tmp_path: Path) -> None:
    src = write_plain(tmp_path / "a.tif", movie((20, 16, 16), "uint16"))
    for args, needle in ((["--shard", "6,16,16", "--chunks", "4,16,16"], "multiple"),
                         (["--shard", "8,16,16", "--zarr-format", "2"], "no shards"),
                         (["--shard", "8,16"], "T,Y,X")):
        out = tmp_path / "o.zarr"
        result = run_cli("convert", str(src), "-o", str(out), "--no-progress", *args)
        assert_clean_error(result, needle)
        assert not out.exists()
