"""export-onnx: the graph ONNX Runtime runs gives the network's output, for any grid size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcad_chunked.errors import ConfigError
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.unet3d import UNet3D
from tests.conftest import assert_clean_error, run_cli
from tests.test_deepcad_rt import deepcad_rt_state

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(params=[None, (13, 7, 7)], ids=["plain", "bypass"])
def model_path(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    torch.manual_seed(0)
    net = UNet3D(features=4, bypass=request.param)
    if request.param is not None:
        with torch.no_grad():
            net.final.weight.normal_(0.0, 0.3)
    return Checkpoint(model_state=net.state_dict(), features=4,
                      normalization={"mean": 100.0, "std": 20.0}).save(tmp_path / "m.pt")


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_exported_graph_matches_the_network_on_other_sizes(tmp_path: Path,
                                                           model_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = run_cli("export-onnx", str(model_path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "ONNX Runtime gives PyTorch's output" in result.stderr
    model = load_model(model_path)
    x = np.random.default_rng(1).normal(size=(2, 1, 24, 40, 16)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(out, x), want, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["deepcad_chunked.normalization"]) == {"mean": 100.0, "std": 20.0}
    assert meta["deepcad_chunked.grid"] == "8" and int(meta["deepcad_chunked.features"]) == 4
    # an existing file is kept unless --overwrite
    assert_clean_error(run_cli("export-onnx", str(model_path), "-o", str(out)), "exists")


def test_normalize_takes_raw_values(tmp_path: Path, model_path: Path) -> None:
    from deepcad_chunked.model.onnx_export import export_onnx

    raw_graph = export_onnx(model_path, tmp_path / "raw.onnx", normalize=True)
    bare_graph = export_onnx(model_path, tmp_path / "bare.onnx")
    raw = np.random.default_rng(2).poisson(100.0, size=(1, 1, 16, 24, 32)).astype(np.float32)
    got = _run(raw_graph, raw)
    want = _run(bare_graph, (raw - 100.0) / 20.0) * 20.0 + 100.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert np.abs(got - raw).max() > 1  # the network did something


def test_deepcad_rt_models_export_bare_only(tmp_path: Path) -> None:
    from deepcad_chunked.model.onnx_export import export_onnx

    pth = tmp_path / "E_10_Iter_100.pth"
    torch.save(deepcad_rt_state(4), pth)
    assert export_onnx(pth, tmp_path / "rt.onnx").is_file()
    with pytest.raises(ConfigError, match="subtracts each recording's own mean"):
        export_onnx(pth, tmp_path / "rt-raw.onnx", normalize=True)
    assert not (tmp_path / "rt-raw.onnx").exists()
    assert not list(tmp_path.glob(".*.tmp"))
