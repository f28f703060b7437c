"""Self-supervised training that streams tile pairs from Zarr."""

from deepcad_chunked.training.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
