"""HDF5, NWB, Suite2p and raw binary recordings: converted bit for bit with their metadata,
exported back, and bad files refused in one line."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from deepcad_chunked import convert
from deepcad_chunked.config import ConvertConfig, RawLayout
from deepcad_chunked.errors import OutputExistsError, SourceError
from deepcad_chunked.jobs.denoise import denoise
from deepcad_chunked.jobs.export import export
from deepcad_chunked.metrics import Frames
from deepcad_chunked.sources.registry import open_sources
from deepcad_chunked.sources.suite2p import read_ops
from deepcad_chunked.store.recording import open_recording
from tests.conftest import assert_clean_error, run_cli
from tests.formats import SHAPE, http_server, movie, write_nwb, write_suite2p

h5py = pytest.importorskip("h5py")
hdf5plugin = pytest.importorskip("hdf5plugin")
pynwb = pytest.importorskip("pynwb")

#: Slabs of 8 frames: a 37-frame recording is 5 tasks, the last one short.
SMALL = ConvertConfig(chunks=(8, 16, 16), shards=(8, 32, 32))


def _converted(client: Client, source: str | list[str], out: Path,
               config: ConvertConfig = SMALL) -> tuple[np.ndarray, dict]:
    rec = convert(source, out, config=config, cluster=client, progress=False)
    assert rec.complete
    return np.asarray(rec.array[:]), rec.attrs


# --------------------------------------------------------------------------- HDF5

@pytest.mark.parametrize("compression", ["gzip", "blosc-lz4", None])
def test_hdf5_converts_bit_for_bit_with_its_scales(client: Client, tmp_path: Path,
                                                  compression: str | None) -> None:
    data = movie("uint16")
    filters = {"gzip": {"compression": "gzip", "compression_opts": 4},
               "blosc-lz4": dict(hdf5plugin.Blosc(cname="lz4")), None: {}}[compression]
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        ds = f.create_dataset("acq/mov", data=data, chunks=(5, 23, 29), **filters)
        ds.attrs["fr"] = 30.0
        ds.attrs["element_size_um"] = [1.0, 0.8, 0.6]
    stored, attrs = _converted(client, str(tmp_path / "rec.h5"), tmp_path / "out.zarr")
    assert stored.dtype == np.uint16 and stored.shape == SHAPE
    assert stored.tobytes() == data.tobytes()
    assert attrs["frame_rate_hz"] == pytest.approx(30.0)
    assert attrs["pixel_size_um"] == pytest.approx([0.8, 0.6])
    assert attrs["statistics"]["max"] == data.max()
    [source] = attrs["provenance"]["sources"]
    assert source["kind"] == "hdf5" and source["path"] == str(tmp_path / "rec.h5")


def test_hdf5_dataset_is_named_after_a_colon_when_there_are_several(client: Client,
                                                                     tmp_path: Path) -> None:
    a, b = movie("float32"), movie("int16", seed=1)
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"] = a
        f.create_group("g")["b"] = b
        f["labels"] = np.arange(5)  # not 3-D: never a candidate
    with pytest.raises(SourceError, match=r"holds 2 3-D datasets \(/a, /g/b\); name one: "
                       r"two\.h5:/a"):
        open_sources(str(tmp_path / "two.h5"))
    stored, _ = _converted(client, f"{tmp_path / 'two.h5'}:/g/b", tmp_path / "b.zarr")
    assert stored.dtype == np.int16 and stored.tobytes() == b.tobytes()
    assert np.array_equal(open_sources(f"{tmp_path / 'two.h5'}:a").read(3, 9), a[3:9])
    with pytest.raises(SourceError, match="has no dataset /c"):
        open_sources(f"{tmp_path / 'two.h5'}:/c")


def test_hdf5_files_of_a_folder_or_a_glob_join_in_natural_order(client: Client,
                                                                tmp_path: Path) -> None:
    data = movie("int16")
    for k, (t0, t1) in enumerate(((0, 10), (10, 25), (25, 37)), start=1):
        with h5py.File(tmp_path / f"part_{k * 5}.h5", "w") as f:  # 5, 10, 15: natural order
            f["mov"] = data[t0:t1]
            f["other"] = np.zeros((2, 3, 4))
    stored, attrs = _converted(client, f"{tmp_path / 'part_*.h5'}:/mov", tmp_path / "g.zarr")
    assert stored.tobytes() == data.tobytes()
    assert [Path(s["path"]).name for s in attrs["provenance"]["sources"]] == \
        ["part_5.h5", "part_10.h5", "part_15.h5"]
    with pytest.raises(SourceError, match="holds 2 3-D datasets"):  # a folder names no dataset
        open_sources(str(tmp_path))


def test_bad_hdf5_files_are_refused_in_one_line(tmp_path: Path) -> None:
    data = movie("uint16", shape=(64, 40, 40))
    with h5py.File(tmp_path / "full.h5", "w") as f:
        f["mov"] = data
    whole = (tmp_path / "full.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(SourceError, match=r"cut.h5 is not a readable HDF5 file") as cut:
        open_sources(str(tmp_path / "cut.h5"))
    assert "\n" not in str(cut.value)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SourceError, match=r"text.h5 is not a readable HDF5 file"):
        open_sources(str(tmp_path / "text.h5"))
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["image"] = data[0]
    with pytest.raises(SourceError, match=r"holds no 3-D dataset"):
        open_sources(str(tmp_path / "flat.h5"))
    with pytest.raises(SourceError, match=r"holds 2-D uint16 data"):
        open_sources(f"{tmp_path / 'flat.h5'}:/image")


def test_an_hdf5_file_rewritten_after_inspection_is_refused(tmp_path: Path) -> None:
    data = movie("uint16")
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f["mov"] = data
    plan = open_sources(str(tmp_path / "rec.h5"))
    assert plan.read(0, 4).tobytes() == data[:4].tobytes()
    with h5py.File(tmp_path / "new.h5", "w") as f:  # another program replaces it
        f["mov"] = data[::-1]
    os.replace(tmp_path / "new.h5", tmp_path / "rec.h5")
    with pytest.raises(SourceError, match="changed while it was being read"):
        plan.read(4, 8)


def test_hdf5_round_trip_through_export(client: Client, tmp_path: Path) -> None:
    data = movie("uint16")
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f["mov"] = data
    rec = convert(str(tmp_path / "rec.h5"), tmp_path / "rec.zarr",
                  config=SMALL.model_copy(update={"frame_rate": 12.5, "pixel_size": 0.5}),
                  cluster=client, progress=False)
    out = export(rec.path, f"{tmp_path / 'back.h5'}:/imaging/denoised", progress=False)
    with h5py.File(out) as f:
        back = f["/imaging/denoised"]
        assert back[:].tobytes() == data.tobytes() and back.dtype == np.uint16
        assert back.attrs["frame_rate_hz"] == pytest.approx(12.5)
    again = open_sources(str(out))  # the only 3-D dataset, and its scales
    assert again.read(0, 37).tobytes() == data.tobytes()
    assert again.first.metadata.frame_interval_s == pytest.approx(1 / 12.5)
    assert again.first.metadata.pixel_size_um == pytest.approx((0.5, 0.5))
    with pytest.raises(OutputExistsError, match="already exists"):
        export(rec.path, out, progress=False)


# --------------------------------------------------------------------------- NWB

def test_nwb_converts_transposed_with_rate_pixel_size_and_session(client: Client,
                                                                  tmp_path: Path) -> None:
    data = movie("uint16")
    write_nwb(tmp_path / "s.nwb", data, rate=7.5, spacing_um=1.25)
    stored, attrs = _converted(client, str(tmp_path / "s.nwb"), tmp_path / "s.zarr")
    assert stored.shape == SHAPE and stored.tobytes() == data.tobytes()
    assert attrs["frame_rate_hz"] == pytest.approx(7.5)
    assert attrs["pixel_size_um"] == pytest.approx([1.25, 1.25])
    info = run_cli("info", str(tmp_path / "s.nwb"))  # what convert reads, before it does
    assert info.returncode == 0, info.stderr
    for line in ("source format  nwb (/acquisition/TwoPhotonSeries/data)", "shape          "
                 "37 × 23 × 29", "frame rate     7.5 Hz", "pixel size     1.25 × 1.25 µm",
                 "device         Scope2P", "imaging plane  plane0: GCaMP6s in V1"):
        assert line in info.stdout, info.stdout
    nwb = attrs["origin"]["nwb"]
    assert nwb["session"]["session_id"] == "m17-s2"
    assert nwb["device"]["manufacturer"] == "Thorlabs"
    assert nwb["imaging_plane"]["indicator"] == "GCaMP6s"


def test_nwb_rate_comes_from_timestamps_when_the_series_has_none(tmp_path: Path) -> None:
    data = movie("int16", shape=(12, 9, 11))
    write_nwb(tmp_path / "t.nwb", data, rate=None, timestamps=np.arange(12) * 0.05 + 3.0)
    plan = open_sources(str(tmp_path / "t.nwb"))
    assert plan.first.metadata.frame_interval_s == pytest.approx(0.05)
    assert plan.read(2, 7).tobytes() == data[2:7].tobytes()


def test_nwb_series_choice_and_bad_files(tmp_path: Path) -> None:
    data = movie("uint16", shape=(10, 9, 11))
    write_nwb(tmp_path / "two.nwb", data, series=("raw", "motion_corrected"))
    with pytest.raises(SourceError, match=r"holds 2 imaging series \(motion_corrected, raw\); "
                       r"name one: two\.nwb:motion_corrected"):
        open_sources(str(tmp_path / "two.nwb"))
    assert open_sources(f"{tmp_path / 'two.nwb'}:raw").read(0, 10).tobytes() == data.tobytes()
    with pytest.raises(SourceError, match=r"no imaging series 'other' \(imaging series: "
                       r"motion_corrected, raw\)"):
        open_sources(f"{tmp_path / 'two.nwb'}:other")
    write_nwb(tmp_path / "none.nwb", data, series=())
    with pytest.raises(SourceError, match="holds no imaging series"):
        open_sources(str(tmp_path / "none.nwb"))
    with h5py.File(tmp_path / "plain.nwb", "w") as f:
        f["mov"] = data
    with pytest.raises(SourceError, match=r"plain.nwb is not a readable NWB file"):
        open_sources(str(tmp_path / "plain.nwb"))


def test_nwb_export_of_the_denoised_keeps_session_device_plane_and_rate(
        client: Client, tmp_path: Path, tiny_model: Path) -> None:
    data = movie("uint16")
    write_nwb(tmp_path / "s.nwb", data, rate=7.5)
    rec = convert(str(tmp_path / "s.nwb"), tmp_path / "s.zarr", config=SMALL, cluster=client,
                  progress=False)
    denoised = denoise(rec.path, tiny_model, tmp_path / "d.zarr", cluster=client,
                       progress=False)
    want = np.asarray(denoised.array[:])
    out = export(denoised.path, tmp_path / "out.nwb", progress=False)
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        nwbfile = io.read()
        series = nwbfile.acquisition["TwoPhotonSeries"]
        assert np.asarray(series.data[:]).transpose(0, 2, 1).tobytes() == want.tobytes()
        assert series.rate == pytest.approx(7.5) and series.unit == "a.u."
        assert nwbfile.session_id == "m17-s2" and nwbfile.lab == "Imaging Lab"
        assert nwbfile.session_start_time.year == 2026
        assert nwbfile.identifier != "session-17"  # a new file has its own identifier
        plane = series.imaging_plane
        assert (plane.indicator, plane.location, plane.excitation_lambda) == \
            ("GCaMP6s", "V1", 920.0)
        assert plane.device.manufacturer == "Thorlabs"
        assert list(plane.grid_spacing) == pytest.approx([1.25e-6, 1.25e-6])
    back = open_sources(str(out))  # and it reads back as a source, scales included
    assert back.read(0, 37).tobytes() == want.tobytes()
    assert back.first.metadata.pixel_size_um == pytest.approx((1.25, 1.25))
    # the recording itself exports bit for bit too
    assert open_sources(str(export(rec.path, tmp_path / "raw.nwb", progress=False))).read(
        0, 37).tobytes() == data.tobytes()


@pytest.mark.timeout(240)  # a stalled request fails here, not after the default 10 minutes
def test_remote_nwb_is_read_by_range_requests(client: Client, tmp_path: Path) -> None:
    pytest.importorskip("remfile")
    data = movie("uint16", shape=(40, 64, 48))
    served = tmp_path / "served"
    served.mkdir()
    write_nwb(served / "asset.nwb", data, rate=10.0)
    size = (served / "asset.nwb").stat().st_size
    with http_server(served) as (base, ranges):
        url = f"{base}/asset.nwb"
        stored, attrs = _converted(client, url, tmp_path / "remote.zarr")
        assert stored.tobytes() == data.tobytes()
        assert attrs["frame_rate_hz"] == pytest.approx(10.0)
        assert attrs["provenance"]["sources"][0]["path"] == url
        assert ranges() and all(b - a + 1 < size for a, b in ranges())  # never the whole file
        with pytest.raises(SourceError, match="HTTP 404"):
            open_sources(f"{base}/missing.nwb")
        # an archive's download URL that names no file (DANDI's): told apart by its bytes
        os.link(served / "asset.nwb", served / "download")
        plan = open_sources(f"{base}/download")
        assert plan.first.kind == "nwb" and plan.read(5, 9).tobytes() == data[5:9].tobytes()
    with http_server(served, ranges=False) as (base, _), \
            pytest.raises(SourceError, match=r"does not answer range requests \(HTTP 200\); "
                          "download the file"):
        open_sources(f"{base}/asset.nwb")


# --------------------------------------------------------------------------- Suite2p

def test_suite2p_plane_converts_int16_with_its_rate(client: Client, tmp_path: Path) -> None:
    data = movie("int16") - 1500
    plane = write_suite2p(tmp_path / "suite2p" / "plane0", data, fs=15.0)
    stored, attrs = _converted(client, str(plane), tmp_path / "s2p.zarr")
    assert stored.dtype == np.int16 and stored.tobytes() == data.tobytes()
    assert attrs["frame_rate_hz"] == pytest.approx(15.0)
    assert attrs["provenance"]["sources"][0]["kind"] == "suite2p"
    with pytest.raises(SourceError, match=r"holds 1 Suite2p planes \(plane0\); convert one "
                       "plane folder"):
        open_sources(str(tmp_path / "suite2p"))


def test_suite2p_ops_disagreeing_with_data_bin_is_refused(tmp_path: Path) -> None:
    data = movie("int16")
    plane = write_suite2p(tmp_path / "plane0", data, nframes=40)
    with pytest.raises(SourceError, match=r"ops\.npy says 40 frames of 23×29 int16 frames "
                       r"\(53360 bytes\) but data\.bin holds 49358 bytes"):
        open_sources(str(plane))
    os.remove(plane / "data.bin")
    with pytest.raises(SourceError, match=r"has ops\.npy but no data\.bin or data_raw\.bin"):
        open_sources(str(plane))


class _Exploit:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_suite2p_ops_are_read_without_running_pickled_code(tmp_path: Path) -> None:
    data = movie("int16", shape=(12, 9, 11))
    marker = tmp_path / "pwned"
    plane = write_suite2p(tmp_path / "plane0", data, extra={"hook": _Exploit(marker)})
    assert b"system" in (plane / "ops.npy").read_bytes()  # the payload is really there
    ops = read_ops(plane / "ops.npy")
    assert not marker.exists()
    assert ops["Ly"] == 9 and ops["Lx"] == 11 and ops["fs"] == 15.0
    assert open_sources(str(plane)).read(0, 12).tobytes() == data.tobytes()
    assert not marker.exists()
    with open(plane / "ops.npy", "wb") as fh:  # not an .npy at all: a bare pickle
        pickle.dump({"Ly": 9}, fh)
    with pytest.raises(SourceError, match=r"is not a readable Suite2p ops.npy"):
        open_sources(str(plane))


def test_suite2p_export_round_trip_and_scaling(client: Client, tmp_path: Path) -> None:
    data = movie("uint16")  # max < 32768: exact in int16
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f["mov"] = data
        f["mov"].attrs["frame_rate_hz"] = 20.0
    rec = convert(str(tmp_path / "rec.h5"), tmp_path / "rec.zarr", config=SMALL,
                  cluster=client, progress=False)
    plane = export(rec.path, tmp_path / "out" / "suite2p" / "plane0", format="suite2p",
                   progress=False)
    assert sorted(p.name for p in plane.iterdir() if not p.name.startswith(".")) == \
        ["data.bin", "db.npy", "ops.npy", "settings.npy"]
    binary = np.fromfile(plane / "data.bin", dtype=np.int16).reshape(SHAPE)
    assert binary.tobytes() == data.astype(np.int16).tobytes()
    ops = np.load(plane / "ops.npy", allow_pickle=True).item()  # as Suite2p loads it
    assert (ops["Ly"], ops["Lx"], ops["nframes"], ops["fs"]) == (23, 29, 37, 20.0)
    assert ops["reg_file"] == str(plane / "data.bin") and ops["do_registration"] == 0
    assert ops["yrange"] == [0, 23] and ops["xrange"] == [0, 29]
    np.testing.assert_allclose(ops["meanImg"], data.mean(0), rtol=1e-6)
    db = np.load(plane / "db.npy", allow_pickle=True).item()  # Suite2p >= 1.0's plane files
    assert (db["Ly"], db["Lx"], db["nframes"], db["reg_file"]) == \
        (23, 29, 37, str(plane / "data.bin"))
    assert np.load(plane / "settings.npy", allow_pickle=True).item() == {"fs": 20.0}
    assert open_sources(str(plane)).read(0, 37).tobytes() == binary.tobytes()
    os.remove(plane / "ops.npy")  # a Suite2p >= 1.0 plane before its run: db.npy, settings.npy
    again = open_sources(str(plane))
    assert again.read(0, 37).tobytes() == binary.tobytes()
    assert again.first.metadata.frame_interval_s == pytest.approx(1 / 20)
    # beyond int16: halved (as Suite2p does with uint16), the divisor recorded
    big = (movie("uint16") * 20).astype(np.uint16)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f["mov"] = big
    rec = convert(str(tmp_path / "big.h5"), tmp_path / "big.zarr", config=SMALL,
                  cluster=client, progress=False)
    plane = export(rec.path, tmp_path / "big_plane", format="suite2p", progress=False)
    ops = read_ops(plane / "ops.npy")
    assert ops["deepcad_divisor"] == 2
    binary = np.fromfile(plane / "data.bin", dtype=np.int16).reshape(SHAPE)
    assert np.array_equal(binary, np.rint(big / 2.0).astype(np.int16))


# --------------------------------------------------------------------------- raw

@pytest.mark.parametrize("layout", [
    RawLayout(shape=(37, 23, 29), dtype="uint16"),
    RawLayout(shape=(-1, 23, 29), dtype=">f4", offset=128),
    RawLayout(shape=(37, 23, 29), dtype="int16", order="F"),
], ids=["c-uint16", "big-endian-float-header", "fortran"])
def test_raw_binary_converts_bit_for_bit(client: Client, tmp_path: Path,
                                         layout: RawLayout) -> None:
    data = movie(np.dtype(layout.dtype).newbyteorder("=").str)
    with open(tmp_path / "rec.raw", "wb") as fh:
        fh.write(b"H" * layout.offset)
        fh.write(data.astype(layout.dtype).tobytes(order=layout.order))
    stored, _ = _converted(client, str(tmp_path / "rec.raw"), tmp_path / "raw.zarr",
                           SMALL.model_copy(update={"raw": layout}))
    assert stored.tobytes() == data.tobytes()


def test_raw_binary_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    movie("uint16").tofile(tmp_path / "rec.raw")
    with pytest.raises(SourceError, match=r"holds 49358 bytes after the header but 40 frames "
                       r"of 23×29 uint16 are 53360 bytes \(cut short\)"):
        open_sources(str(tmp_path / "rec.raw"), RawLayout(shape=(40, 23, 29)))
    with pytest.raises(SourceError, match="not a whole number of 23×30 uint16 frames"):
        open_sources(str(tmp_path / "rec.raw"), RawLayout(shape=(-1, 23, 30)))
    with pytest.raises(SourceError, match="give its layout with --raw-shape"):
        open_sources(str(tmp_path / "rec.raw"))


# --------------------------------------------------------------------------- commands

def test_cli_converts_raw_and_exports_every_format(tmp_path: Path) -> None:
    data = movie("uint16", shape=(20, 16, 24))
    data.tofile(tmp_path / "rec.dat")
    store = tmp_path / "rec.zarr"
    result = run_cli("convert", str(tmp_path / "rec.dat"), "-o", str(store), "--raw-shape",
                     "auto,16,24", "--raw-dtype", "uint16", "--frame-rate", "5", "--pixel-size",
                     "0.7", "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert np.asarray(open_recording(store).array[:]).tobytes() == data.tobytes()
    for name, extra in (("out.h5", ()), ("out.nwb", ()), ("plane0", ("--format", "suite2p")),
                        ("out.tif", ())):
        result = run_cli("export", str(store), "-o", str(tmp_path / name), *extra,
                         "--no-progress")
        assert result.returncode == 0, result.stderr
        back = open_sources(str(tmp_path / name))
        assert back.read(0, 20).astype(np.uint16).tobytes() == data.tobytes(), name
        if name != "plane0":
            assert back.first.metadata.frame_interval_s == pytest.approx(0.2), name
    # the evaluation reader takes any format
    assert Frames(str(tmp_path / "out.h5")).read(0, 20).tolist() == data.astype(float).tolist()
    assert_clean_error(run_cli("convert", str(tmp_path / "rec.dat"), "-o",
                               str(tmp_path / "x.zarr"), "--raw-shape", "20,16,25"),
                       "bytes after the header")
    assert_clean_error(run_cli("convert", str(tmp_path / "rec.dat"), "-o",
                               str(tmp_path / "x.zarr"), "--raw-dtype", "uint8"),
                       "--raw-dtype needs --raw-shape")
    assert_clean_error(run_cli("export", str(store), "-o", str(tmp_path / "out.h5")),
                       "already exists")
    no_rate = tmp_path / "no_rate.zarr"
    assert run_cli("convert", str(tmp_path / "rec.dat"), "-o", str(no_rate), "--raw-shape",
                   "20,16,24", "--workers", "1").returncode == 0
    assert_clean_error(run_cli("export", str(no_rate), "-o", str(tmp_path / "r.nwb")),
                       "has no frame rate, which an NWB series needs: pass --frame-rate")
    assert not (tmp_path / "r.nwb").exists()
    assert run_cli("export", str(no_rate), "-o", str(tmp_path / "r.nwb"), "--frame-rate",
                   "9").returncode == 0
    assert open_sources(str(tmp_path / "r.nwb")).first.metadata.frame_interval_s == \
        pytest.approx(1 / 9)

    assert not (tmp_path / "x.zarr").exists()


def test_a_missing_extra_is_one_line_naming_the_install(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f["mov"] = movie("uint16", shape=(4, 8, 8))
    blocked = ("import sys; sys.modules['h5py'] = None; "
               "from deepcad_chunked.cli.main import main; sys.exit(main(sys.argv[1:]))")
    import subprocess

    result = subprocess.run([sys.executable, "-c", blocked, "convert", str(tmp_path / "rec.h5"),
                             "-o", str(tmp_path / "rec.zarr")], capture_output=True, text=True,
                            timeout=120)
    assert_clean_error(result, "needs the h5py package: pip install 'deepcad-chunked[hdf5]'")
    assert not (tmp_path / "rec.zarr").exists()
    write_nwb(tmp_path / "rec.nwb", movie("uint16", shape=(4, 8, 8)))
    no_nwb = blocked.replace("sys.modules['h5py']", "sys.modules['pynwb']")
    result = subprocess.run([sys.executable, "-c", no_nwb, "info", str(tmp_path / "rec.nwb")],
                            capture_output=True, text=True, timeout=120)
    assert_clean_error(result, "needs the pynwb package: pip install 'deepcad-chunked[nwb]'")
    # a Blosc dataset without hdf5plugin: the filter is missing, said at inspection
    with h5py.File(tmp_path / "blosc.h5", "w") as f:
        f.create_dataset("mov", data=np.zeros((4, 64, 64), np.uint16), chunks=(2, 64, 64),
                         **hdf5plugin.Blosc(cname="zstd"))  # compressible: really filtered
    no_plugin = blocked.replace("sys.modules['h5py']", "sys.modules['hdf5plugin']")
    result = subprocess.run([sys.executable, "-c", no_plugin, "convert",
                             str(tmp_path / "blosc.h5"), "-o", str(tmp_path / "b.zarr")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HDF5_PLUGIN_PATH": str(tmp_path)})
    assert_clean_error(result, "is compressed with an HDF5 filter that is not available",
                       "pip install 'deepcad-chunked[hdf5]' adds hdf5plugin")
