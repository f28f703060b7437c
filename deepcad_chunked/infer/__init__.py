"""Inference: monolithic and chunked application of a trained network."""

from deepcad_chunked.infer.predict import (
    default_halo,
    denoise_dask,
    predict_array,
    receptive_radius,
)

__all__ = ["default_halo", "denoise_dask", "predict_array", "receptive_radius"]
