"""deepcad-chunked: out-of-core, distributed self-supervised denoising of fluorescence recordings.

The Python API mirrors the command line: :func:`convert` a recording (TIFF, HDF5, NWB, Suite2p,
raw) into OME-Zarr, :func:`open_sources` to read its frames as they are, :func:`info` about a
store, :func:`export` it to TIFF, HDF5, NWB or Suite2p, :func:`train` the denoiser,
:func:`load_model` a trained one and :func:`denoise`; :func:`run` does all of it. To see how
good it is: :func:`simulate` a recording with ground truth, :func:`evaluate` and
:func:`preview`; :func:`demo` does all of that. :func:`follow` denoises a recording while it
is being acquired. torch is imported only when training or models are used.
"""

from typing import Any

from deepcad_chunked._version import __version__
from deepcad_chunked.config import (
    CompressionConfig,
    ConvertConfig,
    DenoiseConfig,
    FollowConfig,
    RawLayout,
    SimulationConfig,
    TrainConfig,
)
from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.jobs.convert import convert
from deepcad_chunked.jobs.export import export
from deepcad_chunked.jobs.info import describe as info
from deepcad_chunked.simulate import simulate
from deepcad_chunked.sources.registry import open_sources
from deepcad_chunked.store.recording import Recording, open_recording

__all__ = [
    "CompressionConfig",
    "ConvertConfig",
    "DeepCADError",
    "DenoiseConfig",
    "FollowConfig",
    "RawLayout",
    "Recording",
    "SimulationConfig",
    "TrainConfig",
    "__version__",
    "convert",
    "demo",
    "denoise",
    "evaluate",
    "export",
    "follow",
    "info",
    "load_model",
    "open_recording",
    "open_sources",
    "predict_array",
    "preview",
    "run",
    "simulate",
    "train",
]


def __getattr__(name: str) -> Any:
    if name == "train":
        from deepcad_chunked.jobs.train import train

        return train
    if name == "load_model":
        from deepcad_chunked.model import load_model

        return load_model
    if name == "predict_array":
        from deepcad_chunked.infer import predict_array

        return predict_array
    if name == "denoise":
        from deepcad_chunked.jobs.denoise import denoise

        return denoise
    if name in ("run", "demo"):
        from deepcad_chunked.jobs import run as pipeline

        return getattr(pipeline, name)
    if name == "follow":
        from deepcad_chunked.jobs.follow import follow

        return follow
    if name == "evaluate":
        from deepcad_chunked.metrics import score

        return score
    if name == "preview":
        from deepcad_chunked.report import preview

        return preview
    raise AttributeError(f"module 'deepcad_chunked' has no attribute {name!r}")
