"""Chunked inference equals one monolithic pass: the core of seamless denoising."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from distributed import Client

from deepcad_chunked.errors import ConfigError
from deepcad_chunked.infer import default_halo, denoise_dask, predict_array, receptive_radius
from deepcad_chunked.infer.memory import plan_tiles
from deepcad_chunked.infer.predict import block_chunks, mirror_indices
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.unet3d import UNet3D


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = UNet3D(features=2)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return Checkpoint(model_state=net.state_dict(), features=2,
                      normalization={"mean": 100.0, "std": 20.0}).save(path)


@pytest.fixture(scope="module")
def bypass_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A network with a learned linear bypass, both paths with random weights."""
    torch.manual_seed(3)
    net = UNet3D(features=2, bypass=(13, 7, 7))
    with torch.no_grad():
        net.final.weight.normal_(0.0, 0.3)
        net.bypass.weight.add_(torch.randn_like(net.bypass.weight) * 0.01)
    path = tmp_path_factory.mktemp("model") / "bypass.pt"
    return Checkpoint(model_state=net.state_dict(), features=2,
                      normalization={"mean": 100.0, "std": 20.0}).save(path)


def _recording(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100.0, size=shape).astype(np.uint16)


def test_receptive_radius_and_default_halo() -> None:
    assert receptive_radius() == 46  # about 90 voxels across, as DeepCAD-RT's network
    assert default_halo() == 48


@pytest.mark.parametrize("shape, block", [
    ((37, 45, 53), (48, 48, 48)),
    ((100, 90, 70), (48, 56, 64)),
    ((130, 60, 50), (64, 48, 48)),
    ((20, 30, 17), (64, 64, 64)),  # shorter than one block along every axis
    ((57, 8, 9), (48, 48, 48)),
])
def test_chunked_equals_monolithic(client: Client, model_path: Path,
                                   shape: tuple[int, int, int],
                                   block: tuple[int, int, int]) -> None:
    raw = _recording(shape)
    want = predict_array(load_model(model_path), raw)
    lazy = denoise_dask(da.from_array(raw, chunks=(16, 32, 32)), model_path, block=block)
    got = client.compute(lazy).result()
    assert got.shape == raw.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4 * float(raw.max() - raw.min())


def test_chunked_equals_monolithic_with_a_bypass(client: Client,
                                                bypass_model_path: Path) -> None:
    """The bypass is narrower than the U-Net's reach: the default halo stays exact."""
    raw = _recording((100, 90, 70), seed=2)
    model = load_model(bypass_model_path)
    want = predict_array(model, raw)
    with torch.no_grad():  # the bypass is part of what the blocks compute
        model.bypass.weight.zero_()
    assert np.abs(predict_array(model, raw) - want).max() > 1.0
    lazy = denoise_dask(da.from_array(raw, chunks=(16, 32, 32)), bypass_model_path,
                        block=(48, 56, 64))
    got = client.compute(lazy).result()
    assert np.abs(got - want).max() <= 1e-4 * float(raw.max() - raw.min())


def test_a_smaller_halo_trades_exactness(client: Client, model_path: Path) -> None:
    raw = _recording((96, 64, 64), seed=1)
    want = predict_array(load_model(model_path), raw)
    errors = {}
    for halo in (0, 16, 48):
        lazy = denoise_dask(da.from_array(raw, chunks=32), model_path, block=(48, 48, 48),
                            halo=halo)
        errors[halo] = float(np.abs(client.compute(lazy).result() - want).max())
    tolerance = 1e-4 * float(raw.max() - raw.min())
    assert errors[0] > errors[16] > errors[48]
    assert errors[0] > 10 * tolerance  # without a halo, seams show
    assert errors[48] <= tolerance


def test_edges_are_not_darker_than_the_interior(model_path: Path) -> None:
    flat = np.full((40, 24, 24), 130, dtype=np.uint16)
    out = predict_array(load_model(model_path), flat)
    assert float(out.max() - out.min()) < 1e-3  # mirrored edges: a flat movie stays flat


def test_mirror_padding_matches_numpy_even_past_the_axis_length() -> None:
    for n, halo in ((37, 48), (5, 48), (64, 16), (9, 0)):
        a = np.arange(n)
        want = np.pad(np.pad(a, (0, -n % 8), mode="symmetric"), halo, mode="symmetric")
        np.testing.assert_array_equal(mirror_indices(n, halo), want)


def test_block_chunks_put_each_block_on_the_grid() -> None:
    assert block_chunks(100, 48, 48) == (96, 48, 56)
    assert block_chunks(37, 48, 48) == (40 + 96,)
    assert sum(block_chunks(1000, 64, 48)) == 1000 + 2 * 48


@pytest.mark.parametrize("block, halo, message", [
    ((40, 48, 52), None, "multiples of 8"),
    ((16, 48, 48), None, "smaller than the halo"),
    ((48, 48, 48), 12, "multiple of 8"),
])
def test_blocks_and_halos_that_cannot_work(model_path: Path, block, halo, message: str) -> None:
    x = da.zeros((200, 100, 100), dtype=np.uint16, chunks=50)
    with pytest.raises(ConfigError, match=message):
        denoise_dask(x, model_path, block=block, halo=halo)


def test_a_block_too_large_for_memory_is_tiled_inside_its_task(client: Client,
                                                               model_path: Path) -> None:
    raw = _recording((70, 60, 50), seed=2)
    want = predict_array(load_model(model_path), raw)
    whole = denoise_dask(da.from_array(raw, chunks=32), model_path, block=(72, 64, 56))
    limit = (16 + 96) * (64 + 96) * (56 + 96)
    assert len(plan_tiles((72, 64, 56), 48, limit)) > 1  # the one block is cut into tiles
    tiled = denoise_dask(da.from_array(raw, chunks=32), model_path, block=(72, 64, 56),
                         max_voxels=limit)
    got_whole, got_tiled = client.compute([whole, tiled], sync=True)
    tolerance = 1e-4 * float(raw.max() - raw.min())
    assert np.abs(got_tiled - want).max() <= tolerance
    assert np.abs(got_tiled - got_whole).max() <= tolerance
    with pytest.raises(Exception, match="not even an 8-voxel tile"):
        client.compute(denoise_dask(da.from_array(raw, chunks=32), model_path,
                                    block=(72, 64, 56), max_voxels=100_000)).result()


def test_segments_of_frames_equal_the_whole(client: Client, model_path: Path) -> None:
    raw = _recording((150, 40, 30), seed=3)
    x = da.from_array(raw, chunks=(16, 40, 30))
    want = predict_array(load_model(model_path), raw)
    parts = [denoise_dask(x, model_path, block=(48, 48, 48), frames=frames)
             for frames in ((0, 48), (48, 144), (144, 150))]
    got = np.concatenate(client.compute(parts, sync=True))
    assert np.abs(got - want).max() <= 1e-4 * float(raw.max() - raw.min())
    with pytest.raises(ConfigError, match="start and end on blocks"):
        denoise_dask(x, model_path, block=(48, 48, 48), frames=(8, 48))
