"""Inference on a CUDA GPU gives the CPU's results: chunked equals monolithic, fp32 equals the
CPU's fp32, reduced precisions stay close. Run where a GPU is visible (``-m gpu``); skipped
elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

from deepcad_chunked import DenoiseConfig, denoise, predict_array
from deepcad_chunked.config import BYPASS_KERNEL
from deepcad_chunked.infer import denoise_dask
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.unet3d import UNet3D
from deepcad_chunked.store.recording import open_recording

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module", params=[None, BYPASS_KERNEL], ids=["plain", "bypass"])
def model16(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepCAD-RT's f = 16 network with seeded random weights, and the same with training's
    linear bypass (inference computes it by FFT on the GPU too)."""
    torch.manual_seed(0)
    model = UNet3D(16, bypass=request.param)
    if request.param is not None:  # a trained network's last layer is not the fresh zero one
        torch.nn.init.normal_(model.final.weight, std=0.05)
    path = tmp_path_factory.mktemp("model") / "f16.pt"
    return Checkpoint(model_state=model.state_dict(), features=16,
                      normalization={"mean": 100.0, "std": 20.0}).save(path)


@pytest.fixture(scope="module")
def gpu_client() -> Iterator[Client]:
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", resources={"GPU": 1}) as cluster, \
            Client(cluster) as client:
        yield client


def _raw(shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(0).poisson(100.0, size=shape).astype(np.uint16)


def test_cuda_fp32_equals_the_cpu(model16: Path) -> None:
    raw = _raw((40, 72, 64))
    model = load_model(model16)
    cpu = predict_array(model, raw, device="cpu")
    gpu = predict_array(load_model(model16).cuda(), raw, device="cuda")
    assert np.abs(gpu - cpu).max() <= 1e-4 * float(cpu.max() - cpu.min())


@pytest.mark.parametrize("precision, tolerance", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_reduced_precision_stays_close_to_fp32(model16: Path, precision: str,
                                               tolerance: float) -> None:
    raw = _raw((40, 72, 64))
    want = predict_array(load_model(model16).cuda(), raw, device="cuda")
    got = predict_array(load_model(model16).cuda(), raw, device="cuda", precision=precision)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= tolerance * float(want.max() - want.min())


def test_chunked_on_cuda_equals_monolithic(gpu_client: Client, model16: Path) -> None:
    raw = _raw((100, 90, 70))
    want = predict_array(load_model(model16).cuda(), raw, device="cuda")
    lazy = denoise_dask(da.from_array(raw, chunks=(32, 48, 48)), model16,
                        block=(48, 56, 64), device="cuda")
    got = gpu_client.compute(lazy).result()
    assert np.abs(got - want).max() <= 1e-4 * float(want.max() - want.min())


def test_denoise_store_to_store_on_a_gpu_worker(tmp_path: Path, gpu_client: Client,
                                                model16: Path) -> None:
    import tifffile

    from deepcad_chunked import convert

    raw = _raw((96, 80, 80))
    tifffile.imwrite(tmp_path / "r.tif", raw, photometric="minisblack")
    store = convert(tmp_path / "r.tif", tmp_path / "r.zarr", cluster=gpu_client,
                    progress=False).path
    out = denoise(store, model16, tmp_path / "o.zarr", cluster=gpu_client, progress=False,
                  config=DenoiseConfig(device="cuda", dtype="float32"))
    assert out.attrs["parameters"]["device"] == "cuda"
    want = predict_array(load_model(model16).cuda(), raw, device="cuda")
    got = open_recording(out.path).array[:]
    assert np.abs(got - want).max() <= 1e-4 * float(want.max() - want.min())
