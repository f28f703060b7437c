"""Models trained by DeepCAD-RT: its ``.pth`` weights and ``para.yaml``, read into our network.

DeepCAD-RT saves ``torch.save(Network_3D_Unet.state_dict())``: the U-Net sits under
``Generator.`` (``module.Generator.`` when it was wrapped in ``DataParallel``), each level is
``encoders.K`` / ``decoders.K`` with a ``basic_module`` of two ``SingleConv`` layers, and the
last layer is ``final_conv``. The architecture is ours (:mod:`~deepcad_chunked.model.unet3d`),
so the mapping is a renaming of keys, checked name by name and shape by shape.

DeepCAD-RT denoises ``x = raw / scale_factor − mean(raw)`` and maps the output back with
``(y + mean(raw)) · scale_factor``, the mean taken over the recording being denoised. That is
our ``(raw − m) / s`` with ``s = scale_factor`` and ``m = scale_factor · mean(raw)``: such
models carry the normalisation ``{"mean": "recording", "std": scale_factor}``, resolved for
each recording by :func:`resolve_normalization`. ``scale_factor`` and ``fmap`` come from the
``para.yaml`` that DeepCAD-RT writes beside its models (1 and the weights' own width when
there is none).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.model.unet3d import LEVELS

#: Keys of DeepCAD-RT's state dict, and where each goes in ours.
_LEVEL = re.compile(r"(encoders|decoders)\.(\d+)\.basic_module\.SingleConv([12])\.conv\."
                    r"(weight|bias)")
_FINAL = re.compile(r"final_conv\.(weight|bias)")
_PREFIX = re.compile(r"^(?:module\.)?Generator\.")
#: The normalisation of a DeepCAD-RT model: the mean is the recording's own.
RECORDING_MEAN = "recording"


def looks_like_deepcad_rt(state: Any) -> bool:
    """Whether ``state`` is a DeepCAD-RT state dict (keys under ``Generator.``)."""
    return (isinstance(state, Mapping) and bool(state)
            and all(isinstance(k, str) for k in state)
            and any(_PREFIX.match(k) for k in state))


def convert_state(state: Mapping[str, Any], source: str | Path) -> dict[str, torch.Tensor]:
    """DeepCAD-RT's ``Network_3D_Unet`` state dict → ours.

    Raises
    ------
    DeepCADError
        For keys this network does not have (another architecture, e.g. a residual U-Net or
        one with normalisation layers), missing keys, or values that are not tensors.
    """
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _PREFIX.sub("", key, count=1)
        if name == key:
            raise DeepCADError(f"{source}: key {key!r} is not part of DeepCAD-RT's "
                               "Network_3D_Unet")
        if not isinstance(value, torch.Tensor):
            raise DeepCADError(f"{source}: {key} is not a tensor")
        level, final = _LEVEL.fullmatch(name), _FINAL.fullmatch(name)
        if level:
            part, index, conv, kind = level.groups()
            target = f"{part}.{index}.{0 if conv == '1' else 2}.{kind}"
        elif final:
            target = f"final.{final.group(1)}"
        else:
            raise DeepCADError(f"{source}: {key} belongs to another network than DeepCAD-RT's "
                               "3D U-Net (a residual U-Net, or one with normalisation layers?)")
        ours[target] = value
    expected = ({f"encoders.{k}.{i}.{w}" for k in range(LEVELS) for i in (0, 2)
                 for w in ("weight", "bias")}
                | {f"decoders.{k}.{i}.{w}" for k in range(LEVELS - 1) for i in (0, 2)
                   for w in ("weight", "bias")}
                | {"final.weight", "final.bias"})
    missing = sorted(expected - set(ours))
    if missing:
        raise DeepCADError(f"{source}: not a complete DeepCAD-RT network ({len(missing)} "
                           f"weights missing, e.g. {missing[0]}); a network of "
                           f"{LEVELS} levels is expected")
    return ours


def features_of(state: Mapping[str, torch.Tensor]) -> int:
    """``f`` (DeepCAD-RT's ``fmap``): the output channels of the first level."""
    return int(state["encoders.0.2.weight"].shape[0])


def read_para(model_file: Path) -> dict[str, Any]:
    """DeepCAD-RT's ``para.yaml`` beside ``model_file`` (empty when there is none).

    Raises
    ------
    DeepCADError
        When the file exists but is not a YAML mapping.
    """
    import yaml

    path = model_file.with_name("para.yaml")
    if not path.is_file():
        return {}
    try:
        para = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeepCADError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(para, dict):
        raise DeepCADError(f"{path} is not DeepCAD-RT's parameter file (a YAML mapping)")
    return para


def normalization_of(para: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The normalisation of a DeepCAD-RT model with parameters ``para``."""
    scale = para.get("scale_factor", 1)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise DeepCADError(f"{source.with_name('para.yaml')}: scale_factor {scale!r} is not "
                           "a number") from None
    if not scale > 0:
        raise DeepCADError(f"{source.with_name('para.yaml')}: scale_factor must be positive, "
                           f"got {scale}")
    return {"mean": RECORDING_MEAN, "std": scale}


def resolve_normalization(norm: Mapping[str, Any], recording_mean: float | None
                          ) -> tuple[float, float]:
    """``(mean, std)`` of a normalisation for one recording.

    ``{"mean": "recording", "std": s}`` (a DeepCAD-RT model) becomes ``(s · recording_mean,
    s)``; a number is used as it is.

    Raises
    ------
    DeepCADError
        When the recording's mean is needed but not given.
    """
    std = float(norm["std"])
    if norm["mean"] == RECORDING_MEAN:
        if recording_mean is None:
            raise DeepCADError("this model (from DeepCAD-RT) subtracts the mean of the "
                               "recording; it is not known here")
        return std * float(recording_mean), std
    return float(norm["mean"]), std
