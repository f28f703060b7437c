"""A trained network as an ONNX graph, for ONNX Runtime or TensorRT.

The graph takes ``(n, 1, t, y, x)`` float32 volumes with t, y and x any multiples of 8 (the
axes are dynamic). By default it is the bare network, which expects normalised input, as
DeepCAD-RT's own export; ``normalize=True`` puts the model's normalisation inside, so that the
graph takes and returns raw sample values. The normalisation, the grid and the halo needed for
exact tiling are written into the model's metadata either way.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepcad_chunked.errors import ConfigError, OutputExistsError
from deepcad_chunked.model.calibration import Calibration, output_calibration
from deepcad_chunked.model.checkpoint import Checkpoint
from deepcad_chunked.model.deepcad_rt import RECORDING_MEAN
from deepcad_chunked.model.unet3d import GRID, UNet3D
from deepcad_chunked.store.pins import check_disjoint

log = logging.getLogger(__name__)

#: The ONNX opset of exported graphs (TensorRT 8.6 and later read it).
OPSET = 17
#: Largest difference allowed between ONNX Runtime and PyTorch on a check volume.
TOLERANCE = 1e-4


class _Normalized(nn.Module):
    """The network between its normalisation and its inverse."""

    def __init__(self, net: UNet3D, mean: float, std: float,
                 calibration: Calibration | None = None) -> None:
        super().__init__()
        self.net, self.mean, self.std = net, float(mean), float(std)
        self.calibration = nn.Identity() if calibration is None else calibration.module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.calibration(self.net((x - self.mean) / self.std))
        return y * self.std + self.mean


def export_onnx(model: str | Path, output: str | Path, *, normalize: bool = False,
                opset: int = OPSET, overwrite: bool = False) -> Path:
    """Write the network of a checkpoint as an ONNX file.

    Parameters
    ----------
    model : str or Path
        A checkpoint of ours or a DeepCAD-RT ``.pth``.
    output : str or Path
        The ``.onnx`` file to write (atomically).
    normalize : bool
        Take and return raw sample values instead of normalised ones.
    opset : int
        ONNX opset version.
    overwrite : bool
        Replace an existing ``output``.

    Returns
    -------
    Path
        ``output``.

    Raises
    ------
    ConfigError
        Without the ``onnx`` package, or ``normalize`` for a model whose mean is the
        recording's (DeepCAD-RT's), or when ONNX Runtime disagrees with PyTorch.
    OutputExistsError
        When ``output`` exists and ``overwrite`` is not set.
    """
    try:
        import onnx
    except ImportError:
        raise ConfigError("export-onnx needs the onnx package: pip install "
                          "'deepcad-chunked[onnx]'") from None
    output = Path(output).expanduser().absolute()
    check_disjoint(output, [model])  # -o the model itself would replace it
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise ConfigError(f"folder {output.parent} does not exist")
    ckpt = Checkpoint.load(model)
    net = ckpt.build_model()
    norm = ckpt.normalization
    module: nn.Module = net
    if normalize:
        if norm["mean"] == RECORDING_MEAN:
            raise ConfigError("this model (from DeepCAD-RT) subtracts each recording's own "
                              "mean, which cannot be built into the graph; export it without "
                              "--normalize")
        module = _Normalized(net, norm["mean"], norm["std"], output_calibration(norm))
    elif output_calibration(norm) is not None:
        log.info("the graph is the bare network: apply the intensity calibration in the "
                 "metadata's normalization (output + interp(output, knots, shift)) yourself, "
                 "or export with --normalize, which builds it in")
    module.eval()
    example = torch.zeros(1, 1, 2 * GRID, 4 * GRID, 4 * GRID)
    axes = {0: "n", 2: "t", 3: "y", 4: "x"}
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing warnings about the input-shape check
            torch.onnx.export(module, (example,), str(tmp), input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": axes,
                                                                     "output": axes},
                              opset_version=opset, dynamo=False)
        graph = onnx.load(str(tmp))
        from deepcad_chunked.model.unet3d import receptive_radius

        meta = {"deepcad_chunked.features": str(ckpt.features),
                "deepcad_chunked.normalization": json.dumps(norm),
                "deepcad_chunked.input": "raw samples" if normalize else
                "(raw - mean) / std; output * std + mean gives raw units",
                "deepcad_chunked.grid": str(GRID),
                "deepcad_chunked.receptive_radius": str(receptive_radius()),
                "deepcad_chunked.digest": ckpt.digest}
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        _compare_with_onnxruntime(tmp, module)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (opset %d, %s input)", output, opset,
             "raw" if normalize else "normalised")
    return output


def _compare_with_onnxruntime(path: Path, module: nn.Module) -> None:
    """Run the graph once in ONNX Runtime, when installed, and compare it with PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime is not installed: the exported graph was not run")
        return
    x = np.random.default_rng(0).normal(size=(1, 1, 16, 24, 32)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    scale = max(1.0, float(np.abs(want).max()))
    error = float(np.abs(got - want).max()) / scale
    if error > TOLERANCE:
        raise ConfigError(f"the exported graph disagrees with PyTorch (relative error "
                          f"{error:.2g}); not written")
    log.info("ONNX Runtime gives PyTorch's output (relative error %.1g)", error)
