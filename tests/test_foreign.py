"""Recordings written by other tools (OME-Zarr images, plain Zarr arrays), read as they are."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from distributed import Client

from deepcad_chunked import (
    ConvertConfig,
    DenoiseConfig,
    TrainConfig,
    convert,
    denoise,
    export,
    info,
    open_recording,
)
from deepcad_chunked.errors import StoreError
from deepcad_chunked.jobs.train import train
from deepcad_chunked.store.foreign import SIDECAR_SUFFIX
from tests.conftest import assert_clean_error, run_cli
from tests.tiffs import movie, write_ome


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its bytes: proof that nothing was written."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _ome_zarr_py(path: Path, data: np.ndarray, version: str) -> Path:
    """An OME-Zarr image as ome-zarr-py writes it (a pyramid; full resolution at ``s0``)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.group(store=parse_url(str(path), mode="w", fmt=fmt).store,
                      zarr_format=2 if version == "0.4" else 3)
    names = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    axes = "tcyx" if data.ndim == 4 else "tyx"
    write_image(data, root, axes=[{"name": a, "type": names[a]} for a in axes], fmt=fmt)
    return path


def _plain_ngff(path: Path, data: np.ndarray) -> Path:
    """NGFF 0.4 written with zarr alone: units, a scale on the image and on the level, a
    translation, full resolution at ``full``."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("full", data=data, chunks=(8, 16, 16))
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": "rec",
        "axes": [{"name": "t", "type": "time", "unit": "millisecond"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "nanometer"}],
        "datasets": [{"path": "full", "coordinateTransformations": [
            {"type": "scale", "scale": [50.0, 0.5, 400.0]},
            {"type": "translation", "translation": [0.0, 3.0, 3.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 1.0]}]}]
    return path


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_py_image_is_read_as_it_is(tmp_path: Path, client: Client, tiny_model: Path,
                                           version: str) -> None:
    data = movie((32, 2, 24, 24), "uint16")
    store = _ome_zarr_py(tmp_path / "theirs.zarr", data, version)
    before = _tree(store)
    rec = open_recording(store)
    assert rec.foreign and rec.axes == ("t", "c", "y", "x") and rec.shape == data.shape
    assert rec.statistics is None  # not computed until something needs them
    described = info(store)
    assert described["ngff_version"] == version and described["statistics"] is None

    out = tmp_path / "dn.zarr"
    theirs = denoise(store, tiny_model, out, config=DenoiseConfig(block=(16, 16, 16), halo=8),
                     cluster=client, progress=False)
    ours = convert(write_ome(tmp_path / "a.tif", data, axes="TCYX"), tmp_path / "ours.zarr",
                   config=ConvertConfig(chunks=(8, 8, 8)), cluster=client, progress=False)
    reference = denoise(ours.path, tiny_model, tmp_path / "ref.zarr",
                        config=DenoiseConfig(block=(16, 16, 16), halo=8), cluster=client,
                        progress=False)
    assert theirs.array[:].tobytes() == reference.array[:].tobytes()
    assert not theirs.foreign and theirs.axes == rec.axes

    sidecar = store.with_name(store.name + SIDECAR_SUFFIX)
    kept = json.loads(sidecar.read_text())["statistics"]
    assert kept["mean"] == pytest.approx(data.mean(dtype=np.float64), rel=1e-12)
    assert kept == ours.statistics
    assert open_recording(store).statistics == kept  # read back, not computed again

    tif = export(store, tmp_path / "back.tif", progress=False)
    assert tifffile.imread(tif).tobytes() == data.tobytes()
    assert _tree(store) == before, "a store written by another tool was written into"


def test_training_reads_a_foreign_level_and_its_units(tmp_path: Path) -> None:
    data = movie((48, 32, 32), "uint16")
    store = _plain_ngff(tmp_path / "theirs.zarr", data)
    rec = open_recording(store)
    assert rec.frame_interval_s == pytest.approx(0.05)
    assert rec.attrs["pixel_size_um"] == pytest.approx([1.0, 0.4])
    result = train(store, tmp_path / "run", config=TrainConfig(
        patch=(8, 16, 16), features=2, epochs=1, steps_per_epoch=2, batch_size=2, workers=0,
        val_fraction=0.2, device="cpu"), progress=False)
    assert result.best.is_file()
    mean = json.loads(store.with_name(store.name + SIDECAR_SUFFIX).read_text())
    assert mean["statistics"]["mean"] == pytest.approx(data.mean(dtype=np.float64), rel=1e-12)


def test_a_changed_store_is_summarised_again(tmp_path: Path) -> None:
    data = movie((20, 16, 16), "uint16")
    store = _plain_ngff(tmp_path / "theirs.zarr", data)
    first = open_recording(store).with_statistics().statistics
    zarr.open_array(str(store / "full"), mode="r+")[:4] = 0  # another tool rewrites it
    again = open_recording(store)
    assert again.statistics is None
    assert again.with_statistics().statistics["min"] == 0 != first["min"]


def test_read_only_store_keeps_its_statistics_in_the_cache(
        tmp_path: Path, readonly_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = movie((20, 16, 16), "uint16")
    _plain_ngff(tmp_path / "theirs.zarr", data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the read-only folder holds the store: copy it in before it is made read-only
    import shutil
    import subprocess

    subprocess.run(["mount", "-o", "remount,rw", str(readonly_dir)], capture_output=True)
    try:
        shutil.copytree(tmp_path / "theirs.zarr", readonly_dir / "theirs.zarr")
    except OSError:
        pytest.skip("cannot fill the read-only folder here")
    finally:
        subprocess.run(["mount", "-o", "remount,ro", str(readonly_dir)], capture_output=True)
    store = readonly_dir / "theirs.zarr"
    stats = open_recording(store).with_statistics().statistics
    assert stats["max"] == data.max()
    cached = list((tmp_path / "cache" / "deepcad-chunked" / "sidecars").glob("*.json"))
    assert len(cached) == 1 and not store.with_name(store.name + SIDECAR_SUFFIX).exists()
    assert open_recording(store).statistics == stats


def test_plain_array_with_axes(tmp_path: Path, client: Client) -> None:
    data = movie((24, 16, 20), "int16")
    zarr.create_array(str(tmp_path / "v2.zarr"), data=data, chunks=(8, 16, 20), zarr_format=2)
    named = zarr.create_array(str(tmp_path / "named.zarr"), shape=data.shape, dtype=data.dtype,
                              chunks=(8, 8, 8), dimension_names=["t", "y", "x"])
    named[:] = data
    assert_clean_error(run_cli("info", str(tmp_path / "v2.zarr")), "--axes tyx")
    result = run_cli("info", str(tmp_path / "v2.zarr"), "--axes", "tyx", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["axes"] == ["t", "y", "x"]
    assert open_recording(tmp_path / "named.zarr").axes == ("t", "y", "x")
    assert_clean_error(run_cli("info", str(tmp_path / "v2.zarr"), "--axes", "yxt"), "t[c][z]yx")
    out = tmp_path / "back.tif"
    result = run_cli("export", str(tmp_path / "v2.zarr"), "--axes", "tyx", "-o", str(out),
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert tifffile.imread(out).tobytes() == data.tobytes()


def test_what_cannot_be_a_recording_is_one_line(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "stack.zarr"), mode="w")
    group.create_array("0", shape=(4, 8, 8), dtype="u2")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 1]}]}]}]}
    assert_clean_error(run_cli("info", str(tmp_path / "stack.zarr")), "axes zyx")
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w").create_array("a", shape=(4, 4),
                                                                         dtype="u1")
    with pytest.raises(StoreError, match="neither a deepcad-chunked recording nor"):
        open_recording(tmp_path / "bare.zarr")
    assert_clean_error(run_cli("convert", str(tmp_path / "stack.zarr"), "-o",
                               str(tmp_path / "o.zarr")), "is a Zarr store, not source files")
