"""A memory-lean forward pass of the U-Net for inference: the same function, a third of the memory.

:class:`~deepcad_chunked.model.unet3d.UNet3D`'s own forward keeps, at its full-resolution
decoder level, the skip, the upsampled features, their concatenation and the convolution's
output alive at once (about 670 B per input voxel at ``f`` = 16 on the CPU). This one computes
the same function with the same weights, and keeps far less:

- every activation is released as soon as nothing needs it (skips are handed over, not held);
- the concatenation is never built: a convolution over ``cat(skip, up)`` is the sum of a
  convolution over ``skip`` and one over ``up`` with the two halves of the weights;
- the upsampled features are never built either: a 3×3×3 convolution of a nearest-upsampled
  volume equals, for each of the 8 parities of the output voxel, a 2×2×2 convolution of the
  low-resolution volume with weights folded from the 3×3×3 ones — a quarter of the arithmetic,
  at an eighth of the resolution — added into the output in place;
- ReLUs run in place;
- the bypass (a single-channel 13×7×7 convolution, when the network has one) is computed by
  FFT, about eight times faster on the CPU than the direct convolution.

It is for inference only (no autograd); training keeps the module's forward.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F  # noqa: N812
from scipy.fft import next_fast_len

from deepcad_chunked.model.unet3d import UNet3D, check_grid

#: How the three taps (offsets -1, 0, +1) of a full-resolution kernel fall on the two
#: low-resolution taps of a nearest-upsampled axis, for an even (0) and an odd (1) output.
_FOLDS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),   # even 2i: taps i-1 | i, i
          ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))   # odd 2i+1: taps i, i | i+1


def folded_weights(weight: torch.Tensor) -> dict[tuple[int, int, int], torch.Tensor]:
    """The eight 2×2×2 kernels that apply ``weight`` (3×3×3) to a volume upsampled ×2.

    Parameters
    ----------
    weight : torch.Tensor
        ``(out, in, 3, 3, 3)``.

    Returns
    -------
    dict
        ``(pt, py, px)`` parity of the output voxel → ``(out, in, 2, 2, 2)`` kernel, to be
        applied (without padding) to the low-resolution volume padded by one voxel and offset
        by the parity.
    """
    folds = [torch.tensor(f, dtype=weight.dtype, device=weight.device) for f in _FOLDS]
    return {(a, b, c): torch.einsum("ad,be,cf,oidef->oiabc", folds[a], folds[b], folds[c],
                                    weight).contiguous()
            for a, b, c in itertools.product((0, 1), repeat=3)}


def fft_convolve(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv3d(x, weight, padding=k // 2)`` for one channel in and out, computed by FFT.

    The same linear, translation-equivariant function as the direct convolution with zero
    padding (up to float rounding), in float32 whatever the input's dtype.

    Parameters
    ----------
    x : torch.Tensor
        ``(n, 1, t, y, x)``.
    weight : torch.Tensor
        ``(1, 1, kt, ky, kx)``, odd sizes.
    """
    kernel = weight.shape[-3:]
    size = x.shape[-3:]
    # each axis padded to a 5-smooth length (factors 2, 3, 5 only), where the FFT is fast
    padded = [next_fast_len(n + k - 1, real=True) for n, k in zip(size, kernel, strict=True)]
    dims = (-3, -2, -1)
    spectrum = torch.fft.rfftn(x.float(), s=padded, dim=dims)
    spectrum *= torch.fft.rfftn(torch.flip(weight.float(), dims), s=padded, dim=dims)
    full = torch.fft.irfftn(spectrum, s=padded, dim=dims)
    start = [k // 2 for k in kernel]  # the full linear convolution, centred: 'same' output
    return full[..., start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                start[2]:start[2] + size[2]].contiguous()  # the padded volume is released


def _upsample_concat_conv(conv: torch.nn.Conv3d, skips: list[torch.Tensor],
                          low: torch.Tensor) -> torch.Tensor:
    """``relu(conv(cat(skip, upsample(low))))`` without the concatenation or the upsampling.

    The skip is popped from ``skips`` and released as soon as its half is done.
    """
    skip = skips.pop()
    split = skip.shape[1]
    weight = conv.weight
    out = F.conv3d(skip, weight[:, :split], conv.bias, padding=1)
    del skip
    padded = F.pad(low, (1, 1, 1, 1, 1, 1))
    t, y, x = low.shape[-3:]
    for (a, b, c), kernel in folded_weights(weight[:, split:]).items():
        part = F.conv3d(padded[:, :, a:a + t + 1, b:b + y + 1, c:c + x + 1], kernel)
        out[:, :, a::2, b::2, c::2] += part
        del part
    return out.relu_()


def lean_forward(model: UNet3D, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for inference, with far less memory (see the module's description).

    Parameters
    ----------
    model : UNet3D
        The network (its weights are used as they are).
    x : torch.Tensor
        ``(n, c, t, y, x)``, t, y and x multiples of 8.

    Returns
    -------
    torch.Tensor
        What ``model(x)`` returns, up to float rounding.
    """
    check_grid(x)
    with torch.no_grad():
        linear = None if model.bypass is None else fft_convolve(x, model.bypass.weight)
        skips: list[torch.Tensor] = []
        for k, encoder in enumerate(model.encoders):
            if k:
                x = F.max_pool3d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()  # the deepest level is no skip
        for decoder in model.decoders:
            first, _, second, _ = decoder
            x = _upsample_concat_conv(first, skips, x)
            x = F.conv3d(x, second.weight, second.bias, padding=1).relu_()
        x = model.final(x)
        return x if linear is None else x.add_(linear)
