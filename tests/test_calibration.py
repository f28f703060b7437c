"""The intensity calibration: fitted so that pixels keep their temporal mean, applied the same
way by every path that denoises, stored with the model."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from distributed import Client

from deepcad_chunked.infer import default_halo, denoise_dask, predict_array
from deepcad_chunked.infer.kernels import denoise_frames
from deepcad_chunked.infer.predict import span_indices
from deepcad_chunked.model import Checkpoint, load_model
from deepcad_chunked.model.calibration import Calibration, fit_calibration, output_calibration
from deepcad_chunked.model.unet3d import UNet3D

#: A correction far from the identity: +0.4 at the bottom, −0.3 at the top, bent in between.
BENT = Calibration((-3.0, -1.0, 0.0, 1.5, 3.0), (0.4, 0.25, 0.0, -0.1, -0.3))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same random 2-feature network (with a bypass, so that its output varies) saved
    without and with :data:`BENT`."""
    torch.manual_seed(3)
    net = UNet3D(features=2, bypass=(5, 3, 3))
    with torch.no_grad():
        net.final.weight.normal_(0.0, 0.3)
    state = net.state_dict()
    folder = tmp_path_factory.mktemp("model")
    plain = Checkpoint(model_state=state, features=2,
                       normalization={"mean": 100.0, "std": 20.0}).save(folder / "plain.pt")
    bent = Checkpoint(model_state=state, features=2,
                      normalization={"mean": 100.0, "std": 20.0,
                                     "calibration": BENT.as_dict()}).save(folder / "bent.pt")
    return plain, bent


def _recording(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100.0, size=shape).astype(np.uint16)


def test_the_fit_undoes_an_intensity_distortion() -> None:
    """Outputs distorted by a gain and an offset (as an undertrained network's are) get back
    every pixel's mean, dim and bright, though each pixel's mean is noisy."""
    rng = np.random.default_rng(1)
    level = rng.uniform(-1.5, 2.5, size=(1, 40, 40))  # pixels' true means, normalised
    inputs = level + rng.normal(0, 0.5, size=(48, 40, 40))
    clean = level + rng.normal(0, 0.1, size=(48, 40, 40))
    outputs = 1.06 * clean - 0.1  # bright pixels too bright, dim ones too dark
    calibration = fit_calibration([outputs], [inputs])
    fixed = calibration.apply(outputs.astype(np.float32))
    truth = clean.mean(0)  # what each pixel's mean should be (the inputs' is noisier)
    before = np.abs(outputs.mean(0) - truth).mean()
    after = np.abs(fixed.mean(0) - truth).mean()
    assert before > 0.05 and after < 0.01
    low, high = calibration.span()
    assert low < 0 < high  # lifts the dim end, lowers the bright end


def test_errors_of_single_pixels_are_not_taken_for_a_bias() -> None:
    """A network's output wrong at each pixel by its own static amount (fine structure
    blurred, say) but right on average at every brightness needs no correction; fitting each
    pixel's mean would learn a shrinkage that costs SNR."""
    rng = np.random.default_rng(3)
    level = rng.uniform(-1.5, 2.5, size=(1, 48, 48))
    inputs = level + rng.normal(0, 0.5, size=(64, 48, 48))
    static = rng.normal(0, 0.3, size=(1, 48, 48))
    outputs = level + static + rng.normal(0, 0.05, size=(64, 48, 48))
    calibration = fit_calibration([outputs], [inputs])
    low, high = calibration.span()
    assert max(abs(low), abs(high)) < 0.05
    fixed = calibration.apply(outputs.astype(np.float32))
    before = ((outputs - level) ** 2).mean()
    assert ((fixed - level) ** 2).mean() < 1.02 * before


def test_an_unbiased_output_is_left_alone() -> None:
    rng = np.random.default_rng(2)
    level = rng.uniform(-1, 2, size=(1, 32, 32))
    inputs = level + rng.normal(0, 0.5, size=(32, 32, 32))
    outputs = level + rng.normal(0, 0.1, size=(32, 32, 32))
    low, high = fit_calibration([outputs], [inputs]).span()
    assert max(abs(low), abs(high)) < 0.05  # a tenth of the input's noise


def test_the_torch_form_equals_the_numpy_form_also_beyond_the_knots() -> None:
    y = np.linspace(-6, 6, 241, dtype=np.float32)
    want = BENT.apply(y)
    got = BENT.module()(torch.from_numpy(y)).numpy()
    assert np.abs(got - want).max() < 1e-5
    assert want[0] == pytest.approx(-6 + 0.4) and want[-1] == pytest.approx(6 - 0.3)


def test_bad_calibrations_are_refused() -> None:
    with pytest.raises(ValueError):
        Calibration((0.0, 0.0), (1.0, 2.0))
    with pytest.raises(ValueError):
        Calibration.from_dict({"knots": [0, 1, 2], "shift": [0, float("nan"), 0]})
    assert output_calibration({"mean": 1.0, "std": 2.0}) is None


def test_every_path_applies_it_and_chunked_still_equals_monolithic(
        client: Client, calibrated: tuple[Path, Path]) -> None:
    plain, bent = calibrated
    raw = _recording((70, 50, 40))
    before = predict_array(load_model(plain), raw)
    want = predict_array(load_model(bent), raw)
    expected = BENT.apply((before - 100) / 20) * 20 + 100
    assert np.abs(want - expected).max() < 1e-3
    assert np.abs(want - before).max() > 1.0  # the correction is there
    lazy = denoise_dask(da.from_array(raw, chunks=(16, 32, 32)), bent, block=(48, 48, 48))
    got = client.compute(lazy).result()
    assert np.abs(got - want).max() <= 1e-4 * float(raw.max() - raw.min())
    # follow's kernel: frames 16:32 from their span, as a follow task reads them
    halo = default_halo()
    span = raw[span_indices(len(raw), 16, 32, halo)]
    ckpt = Checkpoint.load(bent)
    part = denoise_frames(span, 16, halo=halo, mean=100.0, std=20.0, model_path=str(bent),
                          digest=ckpt.digest, device="cpu", precision="fp32", max_voxels=None)
    assert np.abs(part - want[16:32]).max() <= 1e-4 * float(raw.max() - raw.min())


def test_onnx_with_raw_values_builds_it_in(tmp_path: Path, calibrated: tuple[Path, Path]
                                           ) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from deepcad_chunked.model.onnx_export import export_onnx

    _, bent = calibrated
    graph = export_onnx(bent, tmp_path / "bent.onnx", normalize=True)
    raw = _recording((16, 24, 32), seed=4).astype(np.float32)
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": raw[None, None]})[0][0, 0]
    model = load_model(bent)
    with torch.no_grad():
        bare = model(torch.from_numpy((raw - 100) / 20)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, BENT.apply(bare) * 20 + 100, atol=1e-3)
