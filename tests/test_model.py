"""The network's shapes and size, and checkpoints that load safely."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from deepcad_chunked.model import Checkpoint, CheckpointError, UNet3D, load_model, parameter_count


def test_default_network_has_deepcad_rt_parameter_count() -> None:
    assert parameter_count(UNet3D(features=16)) == 1_020_337


@pytest.mark.parametrize("shape", [(8, 8, 8), (8, 24, 40), (16, 8, 56), (24, 40, 16)])
def test_output_has_input_shape_for_odd_multiples_of_8(shape: tuple[int, int, int]) -> None:
    model = UNet3D(features=2)
    x = torch.randn(2, 1, *shape)
    assert model(x).shape == x.shape


def test_sizes_off_the_grid_are_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        UNet3D(features=2)(torch.zeros(1, 1, 8, 12, 16))


def test_translation_equivariant_on_the_8_grid() -> None:
    torch.manual_seed(0)
    model = UNet3D(features=2).eval()
    x = torch.randn(1, 1, 48, 48, 48)
    with torch.no_grad():
        whole = model(x)
        shifted = model(x[..., 8:, 16:, 8:])
    # far from the borders (beyond the receptive radius) the two agree
    torch.testing.assert_close(whole[..., 8 + 16:40, 16 + 8:40, 8 + 16:40],
                               shifted[..., 16:32, 8:24, 16:32], rtol=1e-4, atol=1e-5)


def _checkpoint(features: int = 2) -> Checkpoint:
    torch.manual_seed(1)
    model = UNet3D(features=features)
    return Checkpoint(model_state=model.state_dict(), features=features,
                      normalization={"mean": 10.0, "std": 2.0}, config={"patch": [8, 16, 16]},
                      epoch=3, step=30)


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    path = _checkpoint().save(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3
    model = load_model(path)
    assert not model.training
    assert model.normalization == {"mean": 10.0, "std": 2.0}
    assert len(model.digest) == 64
    for name, tensor in _checkpoint().model_state.items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = _checkpoint().save(tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated|damaged"):
        load_model(path)


class _Payload:
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))

    def __init__(self, marker: str) -> None:
        self.marker = marker


def test_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "x", "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_model(plain)
    assert not marker.exists()


def test_foreign_and_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a deepcad-chunked checkpoint"):
        load_model(tmp_path / "other.pt")
    ckpt = _checkpoint(features=2)
    ckpt.features = 4  # weights of a 2-feature network declared as 4
    ckpt.save(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_a_fresh_network_with_a_bypass_is_a_gaussian_blur() -> None:
    """Before training, the bypassed network is the Gaussian filter it starts from (zero
    padding), its U-Net contributing nothing; the bypass adds 637 weights."""
    torch.manual_seed(0)
    model = UNet3D(features=2, bypass=(13, 7, 7)).eval()
    assert parameter_count(model) == parameter_count(UNet3D(features=2)) + 13 * 7 * 7
    assert model.bypass_kernel == (13, 7, 7) and UNet3D(features=2).bypass_kernel is None
    x = torch.rand(1, 1, 24, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        got = model.double()(x)[0, 0].numpy()
    t, y, z = (np.arange(n) - n // 2 for n in (13, 7, 7))
    kernel = (np.exp(-t[:, None, None] ** 2 / 8) * np.exp(-y[None, :, None] ** 2 / 2)
              * np.exp(-z[None, None, :] ** 2 / 2))
    want = ndimage.correlate(x[0, 0].numpy(), kernel / kernel.sum(), mode="constant")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)  # a float32 kernel
    with pytest.raises(ValueError, match="odd"):
        UNet3D(features=2, bypass=(12, 7, 7))


def test_a_bypass_checkpoint_rebuilds_its_bypass(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = UNet3D(features=2, bypass=(5, 3, 3))
    with torch.no_grad():
        model.bypass.weight.normal_()
    Checkpoint(model_state=model.state_dict(), features=2, normalization={"mean": 0.0,
               "std": 1.0}).save(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.bypass_kernel == (5, 3, 3)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


@pytest.mark.parametrize("features, shape, bypass", [(2, (8, 8, 8), None),
                                                     (4, (24, 40, 16), None),
                                                     (16, (16, 24, 40), None),
                                                     (4, (24, 40, 16), (13, 7, 7))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_lean_forward_is_the_same_function(features: int, shape: tuple[int, int, int],
                                               bypass: tuple[int, int, int] | None,
                                               channels_last: bool) -> None:
    """The memory-lean inference pass (no concatenation, no upsampled tensor, skips
    released early) equals the module's forward within 1e-5 of its range, fp32."""
    from deepcad_chunked.infer.lean import lean_forward

    torch.manual_seed(features)
    model = UNet3D(features=features, bypass=bypass).eval()
    with torch.no_grad():  # weights that make every level matter, not just biases
        for p in model.parameters():
            p.mul_(1.5)
        if bypass is not None:  # the U-Net's last convolution starts at zero
            model.final.weight.normal_(0.0, 0.3)
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        want = model(x)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    got = lean_forward(model, x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_folded_kernels_convolve_the_upsampled_volume() -> None:
    from deepcad_chunked.infer.lean import folded_weights

    torch.manual_seed(1)
    low = torch.randn(1, 3, 4, 5, 6, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64)
    want = torch.nn.functional.conv3d(
        torch.nn.functional.interpolate(low, scale_factor=2, mode="nearest"), weight, padding=1)
    padded = torch.nn.functional.pad(low, (1, 1, 1, 1, 1, 1))
    got = torch.zeros_like(want)
    for (a, b, c), kernel in folded_weights(weight).items():
        got[:, :, a::2, b::2, c::2] = torch.nn.functional.conv3d(
            padded[:, :, a:a + 5, b:b + 6, c:c + 7], kernel)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_lean_forward_refuses_sizes_off_the_grid() -> None:
    from deepcad_chunked.infer.lean import lean_forward

    with pytest.raises(ValueError, match="multiples of 8"):
        lean_forward(UNet3D(features=2), torch.zeros(1, 1, 8, 12, 16))
