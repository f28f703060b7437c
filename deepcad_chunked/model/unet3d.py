"""The DeepCAD-RT 3D U-Net.

Four levels with ``f, 2f, 4f, 8f`` feature maps; each level is a double 3×3×3 convolution with
ReLU (in the encoder, the first convolution has ``max(out // 2, in)`` channels); 2×2×2 max
pooling down, nearest-neighbour upsampling ×2 up, skips concatenated before the decoder's
double convolution; a final 1×1×1 convolution to one channel. No normalisation layers and no
output activation: the network is fully convolutional and translation-equivariant on a grid of
8 voxels, which is what makes exact chunked inference possible.
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = 4
#: Inputs must be multiples of this along t, y and x (three 2× poolings).
GRID = 2 ** (LEVELS - 1)


def check_grid(x: torch.Tensor) -> None:
    """Refuse an input ``(n, c, t, y, x)`` whose t, y or x is not a multiple of :data:`GRID`.

    Raises
    ------
    ValueError
    """
    if any(s % GRID for s in x.shape[-3:]):
        raise ValueError(f"input t, y, x {tuple(x.shape[-3:])} must be multiples of {GRID}")


class DoubleConv(nn.Sequential):
    """Two 3×3×3 convolutions (padding 1), each followed by ReLU."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, mid_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )


class UNet3D(nn.Module):
    """DeepCAD-RT's denoising network.

    Parameters
    ----------
    features : int
        Feature maps of the first level (``f``); 16 gives DeepCAD-RT's 1,020,337 parameters.
    in_channels, out_channels : int
        Channels of input and output volumes.
    """

    def __init__(self, features: int = 16, in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be positive, got {features}")
        self.features = features
        widths = [features * 2**k for k in range(LEVELS)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(DoubleConv(previous, max(width // 2, previous), width))
            previous = width
        self.decoders = nn.ModuleList(
            DoubleConv(widths[k + 1] + widths[k], widths[k], widths[k])
            for k in reversed(range(LEVELS - 1)))
        self.pool = nn.MaxPool3d(kernel_size=2)
        self.final = nn.Conv3d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch ``(n, c, t, y, x)``; t, y and x must be multiples of 8."""
        check_grid(x)
        skips = []
        for k, encoder in enumerate(self.encoders):
            if k:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = decoder(torch.cat([skip, x], dim=1))
        return self.final(x)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
