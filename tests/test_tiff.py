"""Reading frames from every TIFF flavour, and refusing damaged files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources.tiff import inspect_tiff, plan_sources, read_frames
from tests.tiffs import (
    movie,
    write_imagej,
    write_ome,
    write_pages,
    write_plain,
    write_scanimage,
)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32", "int32"])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_plain_file_frames_read_back_exactly(tmp_path: Path, dtype: str, bigtiff: bool) -> None:
    data = movie((11, 37, 53), dtype)
    [src] = inspect_tiff(write_plain(tmp_path / "a.tif", data, bigtiff=bigtiff))
    assert (src.frames, src.height, src.width, src.axes) == (11, 37, 53, ("t", "y", "x"))
    assert src.contiguous_offset is not None
    np.testing.assert_array_equal(read_frames(src, 0, 11), data)
    np.testing.assert_array_equal(read_frames(src, 4, 7), data[4:7])


def test_non_contiguous_pages_are_read_through_tifffile(tmp_path: Path) -> None:
    data = movie((9, 21, 13), "uint16")
    [src] = inspect_tiff(write_pages(tmp_path / "p.tif", data))
    assert src.contiguous_offset is None
    np.testing.assert_array_equal(read_frames(src, 2, 8), data[2:8])


def test_compressed_pages_are_read(tmp_path: Path) -> None:
    data = movie((7, 16, 24), "uint16")
    [src] = inspect_tiff(write_plain(tmp_path / "z.tif", data, compression="zlib"))
    assert src.contiguous_offset is None
    np.testing.assert_array_equal(read_frames(src, 1, 6), data[1:6])


def test_big_endian_file_gives_native_samples(tmp_path: Path) -> None:
    data = movie((6, 10, 12), "uint16")
    [src] = inspect_tiff(write_plain(tmp_path / "be.tif", data, byteorder=">"))
    out = read_frames(src, 0, 6)
    assert out.dtype == np.dtype("uint16") and out.dtype.isnative
    np.testing.assert_array_equal(out, data)


def test_imagej_hyperstack_becomes_t_c_z(tmp_path: Path) -> None:
    data = movie((5, 3, 2, 17, 19), "uint16")  # ImageJ order TZCYX
    path = write_imagej(tmp_path / "ij.tif", data, finterval=0.25, spacing=2.0, unit="um")
    [src] = inspect_tiff(path)
    assert src.axes == ("t", "c", "z", "y", "x")
    assert src.extra == {"c": 2, "z": 3}
    np.testing.assert_array_equal(read_frames(src, 1, 4), data[1:4].transpose(0, 2, 1, 3, 4))
    assert src.metadata.frame_interval_s == pytest.approx(0.25)
    assert src.metadata.z_spacing_um == pytest.approx(2.0)


def test_imagej_slices_without_frames_are_time(tmp_path: Path) -> None:
    data = movie((12, 9, 8), "int16")
    [src] = inspect_tiff(write_imagej(tmp_path / "s.tif", data, axes="ZYX"))
    assert src.axes == ("t", "y", "x") and src.frames == 12
    np.testing.assert_array_equal(read_frames(src, 0, 12), data)


def test_ome_tiff_axes_order_and_scales(tmp_path: Path) -> None:
    data = movie((4, 2, 3, 10, 11), "uint16")  # TCZYX, OME order XYZCT
    path = write_ome(tmp_path / "o.ome.tif", data, axes="TCZYX", TimeIncrement=50,
                     TimeIncrementUnit="ms", PhysicalSizeX=0.8, PhysicalSizeXUnit="µm",
                     PhysicalSizeY=0.9, PhysicalSizeYUnit="µm")
    [src] = inspect_tiff(path)
    assert src.kind == "ome" and src.extra == {"c": 2, "z": 3}
    np.testing.assert_array_equal(read_frames(src, 0, 4), data)
    np.testing.assert_array_equal(read_frames(src, 2, 3), data[2:3])
    assert src.metadata.frame_interval_s == pytest.approx(0.05)
    assert src.metadata.pixel_size_um == pytest.approx((0.9, 0.8))


def test_ome_tiff_with_time_not_outermost(tmp_path: Path) -> None:
    data = movie((3, 5, 8, 9), "uint16")  # C T Y X: time is not the slowest page axis
    [src] = inspect_tiff(write_ome(tmp_path / "ct.ome.tif", data, axes="CTYX"))
    assert src.extra == {"c": 3} and src.frames == 5
    np.testing.assert_array_equal(read_frames(src, 1, 4), data[:, 1:4].transpose(1, 0, 2, 3))


@pytest.mark.parametrize("channels, planes", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_scanimage_pages_are_deinterleaved(tmp_path: Path, channels: int, planes: int) -> None:
    vol = movie((6, channels, planes, 12, 14), "int16")
    [src] = inspect_tiff(write_scanimage(tmp_path / "si.tif", vol, frame_rate=30.0, z_step=4.0))
    assert src.kind == "scanimage" and src.frames == 6
    want = vol.reshape(6, *([channels] if channels > 1 else []),
                       *([planes] if planes > 1 else []), 12, 14)
    np.testing.assert_array_equal(read_frames(src, 0, 6), want)
    np.testing.assert_array_equal(read_frames(src, 3, 5), want[3:5])
    assert src.metadata.frame_interval_s == pytest.approx(planes / 30.0)
    assert src.metadata.z_spacing_um == (4.0 if planes > 1 else None)


def test_scanimage_partial_last_volume_is_dropped(tmp_path: Path) -> None:
    vol = movie((4, 1, 3, 8, 8), "int16")
    path = write_scanimage(tmp_path / "si.tif", vol)
    with tifffile.TiffWriter(path, append=True) as tw:  # one stray page of an aborted volume
        tw.write(vol[0, 0, 0], photometric="minisblack", metadata=None,
                 software=tifffile.TiffFile(path).pages.first.software)
    [src] = inspect_tiff(path)
    assert src.frames == 4


def test_resolution_tags_give_pixel_size(tmp_path: Path) -> None:
    data = movie((3, 8, 8), "uint16")
    path = write_plain(tmp_path / "r.tif", data, resolution=(2.0, 4.0), resolutionunit="CENTIMETER")
    assert inspect_tiff(path)[0].metadata.pixel_size_um == pytest.approx((2500.0, 5000.0))


def test_not_a_tiff_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.tif"
    path.write_text("these are my notes, not an image\n" * 10)
    with pytest.raises(SourceError, match="not a readable TIFF"):
        inspect_tiff(path)


@pytest.mark.parametrize("writer", [write_plain, write_pages])
@pytest.mark.parametrize("keep", [0.3, 0.8, 0.97])
def test_truncated_file_is_refused(tmp_path: Path, writer, keep: float) -> None:
    path = writer(tmp_path / "t.tif", movie((20, 32, 32), "uint16"))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    with pytest.raises(SourceError, match=r"truncated|damaged"):
        inspect_tiff(path)


def test_rgb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(SourceError, match="RGB"):
        inspect_tiff(path)


def test_changed_file_is_noticed_when_read(tmp_path: Path) -> None:
    path = write_plain(tmp_path / "c.tif", movie((5, 8, 8), "uint16"))
    [src] = inspect_tiff(path)
    write_plain(path, movie((6, 8, 8), "uint16", seed=3))
    with pytest.raises(SourceError, match="changed"):
        read_frames(src, 0, 2)


def test_a_rewrite_with_its_old_times_is_noticed_when_read(tmp_path: Path) -> None:
    """Same size, same modification time, other frames: the status-change time tells."""
    path = write_plain(tmp_path / "r.tif", movie((6, 8, 8), "uint16"))
    [src] = inspect_tiff(path)
    before = path.stat()
    write_plain(path, movie((6, 8, 8), "uint16", seed=5))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    with pytest.raises(SourceError, match="changed while it was being read"):
        read_frames(src, 0, 2)


def test_pages_appended_as_new_series_are_all_read_in_order(tmp_path: Path) -> None:
    data = movie((9, 16, 16), "uint16")
    path = tmp_path / "appended.tif"
    tifffile.imwrite(path, data[:4], photometric="minisblack")
    tifffile.imwrite(path, data[4:7], append=True, photometric="minisblack")
    tifffile.imwrite(path, data[7:], append=True, photometric="minisblack")
    parts = inspect_tiff(path)
    assert [p.frames for p in parts] == [4, 3, 2]
    plan = plan_sources([path])
    assert plan.frames == 9
    np.testing.assert_array_equal(plan.read(0, 9), data)
    np.testing.assert_array_equal(plan.read(3, 8), data[3:8])


def test_series_of_other_sizes_are_refused_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tw:
        for frame in movie((3, 16, 16), "uint16"):
            tw.write(frame, metadata=None)
        tw.write(np.zeros((8, 8), np.uint16), metadata=None)
    with pytest.raises(SourceError, match="2 image series that are not one recording"):
        inspect_tiff(path)


def test_ome_images_of_several_positions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(movie((4, 16, 16), "uint16"), metadata={"axes": "TYX"})
        tw.write(movie((4, 16, 16), "uint16", seed=2), metadata={"axes": "TYX"})
    with pytest.raises(SourceError, match=r"series 1: 4 × 16×16 uint16 \(ome\)"):
        inspect_tiff(path)
