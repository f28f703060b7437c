"""Reading and writing recordings: TIFF archives in, chunked OME-Zarr stores out."""

from deepcad_chunked.io.convert import convert
from deepcad_chunked.io.export import export
from deepcad_chunked.io.info import describe
from deepcad_chunked.io.omezarr import Recording, open_recording

__all__ = ["Recording", "convert", "describe", "export", "open_recording"]
