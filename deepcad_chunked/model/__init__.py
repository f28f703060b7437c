"""The denoising network and its checkpoints."""

from deepcad_chunked.model.checkpoint import Checkpoint, CheckpointError, load_model
from deepcad_chunked.model.unet3d import GRID, UNet3D, parameter_count

__all__ = ["GRID", "Checkpoint", "CheckpointError", "UNet3D", "load_model", "parameter_count"]
