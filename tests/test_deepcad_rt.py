"""Models trained by DeepCAD-RT: its state dict, para.yaml and normalisation, without its code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from distributed import Client

from deepcad_chunked import ConvertConfig, DenoiseConfig, convert, denoise, predict_array
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.checkpoint import CheckpointError
from tests.conftest import assert_clean_error, run_cli
from tests.tiffs import write_plain

F_MAPS = 4


def deepcad_rt_state(f: int, prefix: str = "Generator.", seed: int = 0
                     ) -> dict[str, torch.Tensor]:
    """A state dict with the key names and shapes of DeepCAD-RT's Network_3D_Unet(f_maps=f),
    written from its description: four levels f·2^k, encoder DoubleConv (first conv to
    max(out//2, in) channels), decoder DoubleConv on [skip, upsampled], 1×1×1 final conv."""
    g = torch.Generator().manual_seed(seed)
    widths = [f * 2**k for k in range(4)]
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int, k: int = 3) -> None:
        fan = cin * k**3
        state[f"{prefix}{name}.weight"] = torch.randn(cout, cin, k, k, k, generator=g) / fan**.5
        state[f"{prefix}{name}.bias"] = torch.randn(cout, generator=g) * 0.1

    previous = 1
    for k, out in enumerate(widths):
        mid = max(out // 2, previous)
        conv(f"encoders.{k}.basic_module.SingleConv1.conv", previous, mid)
        conv(f"encoders.{k}.basic_module.SingleConv2.conv", mid, out)
        previous = out
    rev = widths[::-1]
    for k in range(3):
        conv(f"decoders.{k}.basic_module.SingleConv1.conv", rev[k] + rev[k + 1], rev[k + 1])
        conv(f"decoders.{k}.basic_module.SingleConv2.conv", rev[k + 1], rev[k + 1])
    conv("final_conv", widths[0], 1, k=1)
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor,
                      prefix: str = "Generator.") -> torch.Tensor:
    """DeepCAD-RT's forward pass, straight from its state dict with torch.nn.functional."""
    def double(name: str, h: torch.Tensor) -> torch.Tensor:
        for conv in ("SingleConv1", "SingleConv2"):
            key = f"{prefix}{name}.basic_module.{conv}.conv"
            h = F.relu(F.conv3d(h, state[f"{key}.weight"], state[f"{key}.bias"], padding=1))
        return h

    features = []
    for k in range(4):
        if k:
            x = F.max_pool3d(x, 2)
        x = double(f"encoders.{k}", x)
        features.insert(0, x)
    for k, skip in enumerate(features[1:]):
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        x = double(f"decoders.{k}", torch.cat((skip, x), dim=1))
    return F.conv3d(x, state[f"{prefix}final_conv.weight"], state[f"{prefix}final_conv.bias"])


def _save(folder: Path, state: dict[str, torch.Tensor], para: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "E_30_Iter_6000.pth"
    torch.save(state, path)
    if para is not None:
        (folder / "para.yaml").write_text(para)
    return path


def test_weights_map_onto_our_network_and_give_the_same_forward_pass(tmp_path: Path) -> None:
    state = deepcad_rt_state(F_MAPS)
    path = _save(tmp_path / "m", state, f"fmap: {F_MAPS}\nscale_factor: 1\npatch_t: 150\n")
    ckpt = Checkpoint.load(path)
    assert ckpt.features == F_MAPS and ckpt.config["source"] == "DeepCAD-RT"
    ours = ckpt.model_state
    assert torch.equal(ours["encoders.2.0.weight"],
                       state["Generator.encoders.2.basic_module.SingleConv1.conv.weight"])
    assert torch.equal(ours["decoders.0.2.bias"],
                       state["Generator.decoders.0.basic_module.SingleConv2.conv.bias"])
    assert torch.equal(ours["final.weight"], state["Generator.final_conv.weight"])
    model = load_model(path)
    x = torch.randn(1, 1, 16, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(state, x))


def test_dataparallel_prefix_and_no_para_yaml(tmp_path: Path) -> None:
    state = deepcad_rt_state(F_MAPS, prefix="module.Generator.")
    ckpt = Checkpoint.load(_save(tmp_path / "m", state, None))
    assert ckpt.features == F_MAPS
    assert ckpt.normalization == {"mean": "recording", "std": 1.0}


def test_deepcad_rt_normalisation_is_honoured(tmp_path: Path) -> None:
    """out = s · (net(raw / s − mean(raw)) + mean(raw)), DeepCAD-RT's test-time rule."""
    state = deepcad_rt_state(F_MAPS, seed=2)
    scale = 4.0
    path = _save(tmp_path / "m", state, f"fmap: {F_MAPS}\nscale_factor: {scale}\n")
    raw = np.random.default_rng(0).poisson(300.0, (16, 24, 32)).astype(np.uint16)
    got = predict_array(load_model(path), raw, halo=8)
    mean = raw.mean()
    x = np.pad(raw / scale - mean, 8, mode="symmetric").astype(np.float32)
    with torch.no_grad():
        y = reference_forward(state, torch.from_numpy(x)[None, None])[0, 0].numpy()
    want = scale * (y[8:-8, 8:-8, 8:-8] + mean)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_denoise_with_a_deepcad_rt_model_uses_the_recordings_mean(tmp_path: Path,
                                                                  client: Client) -> None:
    path = _save(tmp_path / "m", deepcad_rt_state(F_MAPS, seed=3), f"fmap: {F_MAPS}\n")
    raw = np.random.default_rng(1).poisson(120.0, (40, 48, 40)).astype(np.uint16)
    store = convert(write_plain(tmp_path / "rec.tif", raw), tmp_path / "rec.zarr",
                    config=ConvertConfig(chunks=(16, 16, 16)), cluster=client,
                    progress=False).path
    out = denoise(store, path, tmp_path / "out.zarr",
                  config=DenoiseConfig(block=(48, 48, 48), dtype="float32"), cluster=client,
                  progress=False)
    want = predict_array(load_model(path), raw)
    assert np.abs(out.array[:] - want).max() <= 1e-4 * float(raw.max() - raw.min())
    assert out.attrs["model"]["digest"] == Checkpoint.load(path).digest
    # through the command line, a para.yaml that contradicts the weights is one line
    (path.parent / "para.yaml").write_text("fmap: 16\n")
    assert_clean_error(run_cli("denoise", str(store), "-m", str(path), "-o",
                               str(tmp_path / "cli.zarr"), "--workers", "1"),
                       "says fmap 16 but the weights have 4")
    assert not (tmp_path / "cli.zarr").exists()


@pytest.mark.parametrize("change, message", [
    ("para", "says fmap 8 but the weights have 4"),
    ("groupnorm", "another network"),
    ("missing", "not a complete DeepCAD-RT network"),
    ("foreign", "not a deepcad-chunked checkpoint nor a DeepCAD-RT model"),
])
def test_other_networks_are_refused_in_one_line(tmp_path: Path, change: str,
                                                message: str) -> None:
    state = deepcad_rt_state(F_MAPS)
    para = f"fmap: {F_MAPS}\n"
    if change == "para":
        para = "fmap: 8\n"
    elif change == "groupnorm":
        state["Generator.encoders.0.basic_module.SingleConv1.groupnorm.weight"] = torch.ones(2)
    elif change == "missing":
        del state["Generator.decoders.2.basic_module.SingleConv2.conv.weight"]
    else:
        state = {"net.conv1.weight": torch.ones(1)}
    path = _save(tmp_path / "m", state, para)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.load(path)
