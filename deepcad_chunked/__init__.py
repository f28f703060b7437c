"""deepcad-chunked: out-of-core, distributed self-supervised denoising of fluorescence recordings.

The Python API mirrors the command line: :func:`convert` a TIFF archive into OME-Zarr,
:func:`info` about a store, :func:`export` it back to TIFF, :func:`train` the denoiser and
:func:`load_model` a trained one. torch is imported only when training or models are used.
"""

from typing import Any

from deepcad_chunked._version import __version__
from deepcad_chunked.config import (
    CompressionConfig,
    ConvertConfig,
    DenoiseConfig,
    TrainConfig,
)
from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.io import Recording, convert, export, open_recording
from deepcad_chunked.io import describe as info

__all__ = [
    "CompressionConfig",
    "ConvertConfig",
    "DeepCADError",
    "DenoiseConfig",
    "Recording",
    "TrainConfig",
    "__version__",
    "convert",
    "denoise",
    "export",
    "info",
    "load_model",
    "open_recording",
    "predict_array",
    "train",
]


def __getattr__(name: str) -> Any:
    if name == "train":
        from deepcad_chunked.training import train

        return train
    if name == "load_model":
        from deepcad_chunked.model import load_model

        return load_model
    if name in ("predict_array", "denoise"):
        from deepcad_chunked import infer

        return getattr(infer, name)
    raise AttributeError(f"module 'deepcad_chunked' has no attribute {name!r}")
