"""deepcad-chunked: out-of-core, distributed self-supervised denoising of fluorescence recordings.

The Python API mirrors the command line: :func:`convert` a TIFF archive into OME-Zarr,
:func:`info` about a store, :func:`export` it back to TIFF.
"""

from deepcad_chunked._version import __version__
from deepcad_chunked.config import CompressionConfig, ConvertConfig
from deepcad_chunked.errors import DeepCADError
from deepcad_chunked.io import Recording, convert, export, open_recording
from deepcad_chunked.io import describe as info

__all__ = [
    "CompressionConfig",
    "ConvertConfig",
    "DeepCADError",
    "Recording",
    "__version__",
    "convert",
    "export",
    "info",
    "open_recording",
]
