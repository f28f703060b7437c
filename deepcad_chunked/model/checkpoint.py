"""Checkpoints: one file with everything needed to resume training or to denoise.

A checkpoint is a ``torch.save`` of plain containers, tensors and strings only, so it loads
with ``torch.load(..., weights_only=True)`` and no pickled code is ever executed. The training
configuration and normalisation travel as JSON text. Files are written to a temporary name in
the same folder and renamed, so a kill never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.model.deepcad_rt import (
    convert_state,
    features_of,
    looks_like_deepcad_rt,
    normalization_of,
    read_para,
)
from deepcad_chunked.model.unet3d import UNet3D, bypass_of
from deepcad_chunked.store.location import RemotePath, StorePath, resolve

FORMAT = "deepcad-chunked/checkpoint/1"


class CheckpointError(DeepCADError):
    """A checkpoint is missing, damaged, unsafe, or for another model."""


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """What a checkpoint file holds.

    Attributes
    ----------
    model_state : dict
        The network's weights.
    features : int
        ``f`` of the network.
    normalization : dict
        ``{"mean": m, "std": s}``: inputs are ``(x - m) / s``; outputs are mapped back, after
        the intensity calibration under ``"calibration"`` when there is one
        (:mod:`deepcad_chunked.model.calibration`).
    config : dict
        The full training configuration.
    epoch, step : int
        Epochs and optimiser steps completed.
    optimizer_state, scaler_state : dict
        For resuming; empty in exported models.
    live_state : dict
        For resuming a run that averages its weights (``TrainConfig.average``): the
        optimiser's own weights, while ``model_state`` holds their average (what inference
        uses). Empty otherwise.
    history : list of dict
        Per-epoch losses so far.
    digest : str
        :func:`weights_digest` of ``model_state``.
    """

    model_state: dict[str, torch.Tensor]
    features: int
    normalization: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    optimizer_state: dict[str, Any] = field(default_factory=dict)
    scaler_state: dict[str, Any] = field(default_factory=dict)
    live_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    digest: str = ""

    def save(self, path: str | Path | RemotePath) -> StorePath:
        """Write atomically to ``path`` (a local path or an object-store URL); return it."""
        path = resolve(path)
        self.digest = weights_digest(self.model_state)
        payload = {
            "format": FORMAT,
            "model_state": {k: v.detach().to("cpu") for k, v in self.model_state.items()},
            "features": self.features,
            "normalization": json.dumps(self.normalization),
            "config": json.dumps(self.config),
            "epoch": self.epoch,
            "step": self.step,
            "optimizer_state": self.optimizer_state,
            "scaler_state": self.scaler_state,
            "live_state": {k: v.detach().to("cpu") for k, v in self.live_state.items()},
            "history": json.dumps(self.history),
            "digest": self.digest,
        }
        if isinstance(path, RemotePath):
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            try:
                path.write_bytes(buffer.getvalue())  # one PUT: whole or absent
            except OSError as exc:
                raise CheckpointError(f"cannot write {path}: {exc}") from None
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except (RuntimeError, OSError) as exc:  # torch's writer reports a full disk as either
            full = (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                    or shutil.disk_usage(path.parent).free < 2**20)
            why = ("no space left on its device" if full
                   else getattr(exc, "strerror", None) or str(exc).splitlines()[0][:160])
            raise CheckpointError(f"cannot write {path}: {why}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path | RemotePath,
             map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read a checkpoint safely (``weights_only=True``).

        Raises
        ------
        CheckpointError
            When the file is missing, truncated, contains pickled code, or is not ours.
        """
        path = resolve(path)
        if isinstance(path, Path) and path.is_dir():
            hint = (f": give a checkpoint in it, such as {path / 'best.pt'}"
                    if (path / "best.pt").is_file() else "")
            raise CheckpointError(f"{path} is a folder, not a model file{hint}")
        if not path.is_file():
            raise CheckpointError(f"model file {path} does not exist")
        source: Any = io.BytesIO(path.read_bytes()) if isinstance(path, RemotePath) else path
        if not zipfile.is_zipfile(source):  # torch.save's format; never unpickle anything else
            raise CheckpointError(f"{path} is not a readable model file (not a PyTorch "
                                  "checkpoint, or truncated)")
        if isinstance(source, io.BytesIO):
            source.seek(0)  # is_zipfile read to the end
        try:
            raw = torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
            raise CheckpointError(f"{path} was refused: it is not a plain weights file "
                                  f"({first[:160]})") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable model file (truncated or damaged: "
                                  f"{str(exc).splitlines()[0][:160]})") from None
        if looks_like_deepcad_rt(raw):
            return cls.from_deepcad_rt(raw, path).require_finite(path)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a deepcad-chunked checkpoint nor a "
                                  "DeepCAD-RT model")
        try:
            ckpt = cls(
                model_state=dict(raw["model_state"]),
                features=int(raw["features"]),
                normalization=json.loads(raw["normalization"]),
                config=json.loads(raw["config"]),
                epoch=int(raw["epoch"]),
                step=int(raw["step"]),
                optimizer_state=raw.get("optimizer_state") or {},
                scaler_state=raw.get("scaler_state") or {},
                live_state=dict(raw.get("live_state") or {}),
                history=json.loads(raw.get("history", "[]")),
                digest=str(raw.get("digest", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is a damaged checkpoint (missing {exc})") from None
        if ckpt.digest and weights_digest(ckpt.model_state) != ckpt.digest:
            raise CheckpointError(f"{path} is damaged: its weights do not match their digest")
        return ckpt.require_finite(path)

    def require_finite(self, path: str | Path) -> Checkpoint:
        """Refuse weights with NaN or infinite values (a training run that diverged).

        Raises
        ------
        CheckpointError
        """
        bad = [name for name, t in self.model_state.items()
               if torch.is_tensor(t) and t.is_floating_point()
               and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"{path} holds NaN or infinite weights ({bad[0]}, …): it "
                                  "comes from a training run that diverged; use an earlier "
                                  "epoch's checkpoint, or train again with a lower --lr")
        return self

    @classmethod
    def from_deepcad_rt(cls, state: dict[str, Any], path: Path) -> Checkpoint:
        """A checkpoint of a model trained by DeepCAD-RT (its ``.pth`` and ``para.yaml``).

        Raises
        ------
        CheckpointError
            When the weights are not those of DeepCAD-RT's 3D U-Net, or ``para.yaml``
            disagrees with them.
        """
        try:
            model_state = convert_state(state, path)
            para = read_para(path)
            features = features_of(model_state)
            if "fmap" in para and para["fmap"] != features:
                raise CheckpointError(f"{path.with_name('para.yaml')} says fmap "
                                      f"{para['fmap']} but the weights have {features} "
                                      "feature maps")
            normalization = normalization_of(para, path)
        except DeepCADError as exc:
            raise CheckpointError(str(exc)) from None
        kept = {k: para[k] for k in ("fmap", "scale_factor", "patch_x", "patch_y", "patch_t")
                if k in para}
        return cls(model_state=model_state, features=features, normalization=normalization,
                   config={"source": "DeepCAD-RT", "file": str(path), "para": kept},
                   digest=weights_digest(model_state))

    def build_model(self) -> UNet3D:
        """The network with these weights, in evaluation mode."""
        try:
            model = UNet3D(features=self.features, bypass=bypass_of(self.model_state))
            model.load_state_dict(self.model_state)
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint weights do not fit a {self.features}-feature "
                                  f"network: {str(exc).splitlines()[0]}") from None
        return model.eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> UNet3D:
    """Load a trained denoiser, ready for inference.

    Parameters
    ----------
    path : str or Path
        A checkpoint written by training (``best.pt``, ``last.pt``, …).
    device : str or torch.device
        Where to put the network.

    Returns
    -------
    UNet3D
        In evaluation mode, with ``normalization`` (mean/std), ``digest`` and ``config``
        attributes taken from the checkpoint.
    """
    ckpt = Checkpoint.load(path)
    model = ckpt.build_model().to(device)
    model.normalization = dict(ckpt.normalization)
    model.digest = ckpt.digest
    model.config = dict(ckpt.config)
    return model
