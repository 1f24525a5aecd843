"""Convolutional building blocks shared by the Loci-s modules (appendix C, tables 4-8).

All blocks normalise per sample (channel LayerNorm, never BatchNorm), so batch rows stay
independent: a vector env's row ``i`` never sees row ``j``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchConvTranspose2d",
    "LayerNorm2d",
    "ConvNeXtBlock",
    "ResidualPatchEmbedding",
    "ResidualPatchUpscaling",
    "coordinate_grid",
    "gaussian_heatmap",
]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a ``[N, C, H, W]`` map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depth-wise conv -> LayerNorm -> 1x1 expand (x4) -> SiLU -> 1x1 project.

    ``in_channels != out_channels`` adds a 1x1 projection on the skip path (the tables' ``C -> C'``
    rows, e.g. ``HyperConvNext 128 -> 4``).

    Shapes: ``[N, in_channels, H, W] -> [N, out_channels, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, expansion: int = 4,
                 kernel_size: int = 7, layer_scale: float = 1e-2) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                                   groups=in_channels)
        self.norm = LayerNorm2d(in_channels)
        hidden = max(in_channels, out_channels) * expansion
        self.expand = nn.Conv2d(in_channels, hidden, 1)
        self.project = nn.Conv2d(hidden, out_channels, 1)
        self.gamma = nn.Parameter(torch.full((out_channels,), layer_scale))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def residual(self, x: torch.Tensor, depthwise_out: torch.Tensor) -> torch.Tensor:
        """The block's body after the depth-wise conv; lets hyper variants swap only that conv."""
        y = self.project(F.silu(self.expand(self.norm(depthwise_out))))
        return self.skip(x) + y * self.gamma[:, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.depthwise(x))


class ResidualPatchEmbedding(nn.Module):
    """Strided patch conv plus a parameter-free shortcut (average pool + channel copy).

    The shortcut average-pools by the stride and repeats channels up to ``out_channels``, so the
    block starts close to a down-sampling identity (tables 4, 7, 8: "Conv2D(...) + AvgPool +
    Channel Copy"). When ``out_channels`` is not a multiple of ``in_channels`` the last copy is
    truncated.

    Shapes: ``[N, in_channels, H, W] -> [N, out_channels, H / stride, W / stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, stride, stride=stride)
        self.stride = stride
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.avg_pool2d(x, self.stride)
        repeats = -(-self.out_channels // self.in_channels)
        shortcut = shortcut.repeat(1, repeats, 1, 1)[:, : self.out_channels]
        return shortcut + self.conv(x)


class PatchConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in, out, kernel_size=stride, stride=stride)``, computed as a matmul.

    With kernel = stride and no padding, every input pixel writes its own ``stride x stride`` output
    patch, so the op is one ``[N*H*W, in] @ [in, out*stride*stride]`` product and a reshape: the
    same result as the transposed convolution, 3-7x faster on CPU for the decoder's shapes (oneDNN's
    transposed-conv kernel took ~20 % of a Loci-s step). Parameters and state-dict keys are those of
    ``nn.ConvTranspose2d``, so checkpoints load unchanged.

    Shapes: ``[N, in_channels, H, W] -> [N, out_channels, H * stride, W * stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, stride, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        s, out = self.stride[0], self.out_channels
        patches = x.flatten(2).transpose(1, 2) @ self.weight.reshape(c, out * s * s)  # [N, H*W, out*s*s]
        y = patches.view(n, h, w, out, s, s).permute(0, 3, 1, 4, 2, 5).reshape(n, out, h * s, w * s)
        return y if self.bias is None else y + self.bias.view(1, out, 1, 1)


class ResidualPatchUpscaling(nn.Module):
    """Transposed patch conv plus a parameter-free shortcut (nearest upscale + channel average).

    The inverse of :class:`ResidualPatchEmbedding` (table 8: "Conv2D(...) + Upscale + Channel Avg").
    Channels are averaged in groups of ``in_channels // out_channels`` (``in`` must be a multiple of
    ``out``).

    Shapes: ``[N, in_channels, H, W] -> [N, out_channels, H * stride, W * stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if in_channels % out_channels:
            raise ValueError(f"in_channels must be a multiple of out_channels, actual values: "
                             f"{in_channels}, {out_channels}")
        self.conv = PatchConvTranspose2d(in_channels, out_channels, stride)
        self.stride = stride
        self.group = in_channels // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        shortcut = x.view(n, c // self.group, self.group, h, w).mean(dim=2)
        shortcut = F.interpolate(shortcut, scale_factor=self.stride, mode="nearest")
        return shortcut + self.conv(x)


def coordinate_grid(height: int, width: int, *, device=None, dtype=None) -> torch.Tensor:
    """Pixel-centre coordinates in ``[-1, 1]``: returns ``[2, H, W]`` with channels ``(x, y)``."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])


# Heatmap values below exp(-50) ~ 2e-22 are set to exactly 0. Left as they are, the tails of small
# Gaussians reach float32's subnormal range (< 1.2e-38), and every CPU multiply-add on a subnormal
# operand takes a slow microcode path: the decoder's first convolution, which reads Gestalt x
# heatmap, made a Loci-s step ~1.5x slower on CPU. Values this small never change a float32 sum
# that also holds the peak (1) or a bias, so the outputs stay the same.
_HEATMAP_LOG_CUTOFF = -50.0


def gaussian_heatmap(position: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Isotropic 2-D Gaussian per slot from a position code.

    Args:
        position: ``[..., 4]`` codes ``(x, y, size, priority)``; ``x, y`` in ``[-1, 1]`` and
            ``size`` the standard deviation in the same normalised units (clamped at 1e-3).

    Returns:
        ``[..., H, W]`` heatmap with peak 1 at ``(x, y)``; exactly 0 where it falls below
        ``exp(-50)`` (no subnormal floats, see ``_HEATMAP_LOG_CUTOFF``).
    """
    grid = coordinate_grid(height, width, device=position.device, dtype=position.dtype)
    x = position[..., 0, None, None]
    y = position[..., 1, None, None]
    std = position[..., 2, None, None].clamp_min(1e-3)
    dist2 = (grid[0] - x).pow(2) + (grid[1] - y).pow(2)
    exponent = -0.5 * dist2 / std.pow(2)
    return torch.exp(exponent).masked_fill(exponent < _HEATMAP_LOG_CUTOFF, 0.0)
