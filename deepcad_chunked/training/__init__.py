"""Self-supervised training that streams tile pairs from Zarr (the job that runs it:
:mod:`deepcad_chunked.jobs.train`)."""

from deepcad_chunked.training.loop import TrainResult, fit

__all__ = ["TrainResult", "fit"]
