"""The DeepCAD-RT 3D U-Net.

Four levels with ``f, 2f, 4f, 8f`` feature maps; each level is a double 3×3×3 convolution with
ReLU (in the encoder, the first convolution has ``max(out // 2, in)`` channels); 2×2×2 max
pooling down, nearest-neighbour upsampling ×2 up, skips concatenated before the decoder's
double convolution; a final 1×1×1 convolution to one channel. No normalisation layers and no
output activation: the network is fully convolutional and translation-equivariant on a grid of
8 voxels, which is what makes exact chunked inference possible.

An optional *bypass* (not in DeepCAD-RT) adds a learned linear filter of the input — one
single-channel 3D convolution, started as a Gaussian blur — to the U-Net's output, whose last
convolution then starts at zero: a fresh network is a smoothing filter from its first step,
and training learns only what a filter cannot do. On the simulated recordings this reaches a
given quality in far fewer steps (``benchmarks/RESULTS.md``, issue 17). It is as
translation-equivariant as the rest, and narrower than the U-Net's receptive field, so
chunked inference stays exact.
"""

from __future__ import annotations

import functools

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


#: The bypass's starting Gaussian's σ in voxels (t, y, x): about the best blur of simulated
#: recordings at 1 photon per pixel (σt 4 frames at the full rate is 2 in training's half rate).
BYPASS_SIGMA = (2.0, 1.0, 1.0)


def gaussian_kernel(size: tuple[int, int, int], sigma: tuple[float, float, float]
                    ) -> torch.Tensor:
    """A normalised separable Gaussian ``(t, y, x)`` kernel (odd sizes, centred)."""
    axes = [torch.exp(-0.5 * ((torch.arange(n) - n // 2) / s) ** 2) for n, s in zip(size, sigma,
                                                                                 strict=True)]
    kernel = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return kernel / kernel.sum()


class UNet3D(nn.Module):
    """DeepCAD-RT's denoising network, optionally with a learned linear bypass.

    Parameters
    ----------
    features : int
        Feature maps of the first level (``f``); 16 gives DeepCAD-RT's 1,020,337 parameters.
    in_channels, out_channels : int
        Channels of input and output volumes.
    bypass : tuple of int, optional
        Kernel ``(t, y, x)`` (odd sizes) of a learned linear filter of the input added to the
        output (see the module's description); None, DeepCAD-RT's network, is the default.
    """

    def __init__(self, features: int = 16, in_channels: int = 1, out_channels: int = 1,
                 bypass: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be positive, got {features}")
        self.features = features
        self.bypass: nn.Conv3d | None = None
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
        if bypass is not None:
            size = tuple(int(k) for k in bypass)
            if len(size) != 3 or any(k < 1 or k % 2 == 0 for k in size):
                raise ValueError(f"bypass kernel must be three odd sizes (t, y, x), got {bypass}")
            if in_channels != 1 or out_channels != 1:
                raise ValueError("a bypass needs one input and one output channel")
            self.bypass = nn.Conv3d(1, 1, size, padding=tuple(k // 2 for k in size), bias=False)
            sigma = tuple(min(s, k / 4) for s, k in zip(BYPASS_SIGMA, size, strict=True))
            with torch.no_grad():
                self.bypass.weight.copy_(gaussian_kernel(size, sigma)[None, None])
                self.final.weight.zero_()
                self.final.bias.zero_()

    @property
    def bypass_kernel(self) -> tuple[int, int, int] | None:
        """The bypass's kernel size (t, y, x), or None without one."""
        return None if self.bypass is None else tuple(self.bypass.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch ``(n, c, t, y, x)``; t, y and x must be multiples of 8."""
        check_grid(x)
        linear = None if self.bypass is None else self.bypass(x)
        skips = []
        for k, encoder in enumerate(self.encoders):
            if k:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = decoder(torch.cat([skip, x], dim=1))
        x = self.final(x)
        return x if linear is None else x + linear


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bypass_of(state: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """The bypass kernel a state dict's weights were made with (None: no bypass)."""
    weight = state.get("bypass.weight")
    return None if weight is None else tuple(int(k) for k in weight.shape[-3:])


@functools.lru_cache(maxsize=8)
def receptive_radius(levels_probe: int = 1) -> int:
    """How far (in voxels, along any axis) an output voxel sees into its input.

    Measured once on the architecture: the gradient of one output voxel of a network with
    positive weights spreads over exactly its receptive field.
    """
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the caller's RNG untouched
        torch.manual_seed(0)
        model = UNet3D(features=levels_probe).double()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.rand_like(p) * 0.1 + 0.01)
        n = 192
        x = torch.ones(1, 1, n, 8, 8, dtype=torch.float64, requires_grad=True)
        out = model(x)
        out[0, 0, n // 2, 4, 4].backward()
    reach = torch.nonzero(x.grad[0, 0, :, 4, 4].abs() > 0).flatten()
    return int(max(n // 2 - reach.min().item(), reach.max().item() - n // 2))
