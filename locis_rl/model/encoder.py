"""Slot-wise Hyper-ConvNeXt encoder (paper section 3.2, figure 2, table 4).

Each slot's input stack (frame, error, masks, slot reconstructions, ...) is encoded into a position
code ``(x, y, size, priority)`` and a binarised Gestalt code ``mask | depth | RGB``. Top-down
feedback: every depth-wise kernel of the encoder gets a per-slot residual computed by a
hypernetwork from the slot's *predicted* Gestalt code, so the encoder can tune its filters to the
object the slot is expected to track.

Shapes (``N = B * K`` slots folded into the batch, ``G = config.gestalt_dim``):
``inputs [N, C_in, H, W], gestalt_prior [N, G] -> position [N, 4], gestalt [N, G]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from locis_rl.model.blocks import ConvNeXtBlock, ResidualPatchEmbedding, coordinate_grid, gaussian_heatmap
from locis_rl.model.config import LociSConfig

__all__ = [
    "HyperConvNeXtBlock",
    "HyperSequential",
    "FeaturesMapToPosition",
    "PositionPooling",
    "GestaltHead",
    "HyperConvNeXtEncoder",
    "binarize",
    "MIN_POSITION_SIZE",
    "MAX_POSITION_SIZE",
]

# Range of the predicted Gaussian std (normalised units, image width = 2). Below ~0.02 the
# Gaussian is narrower than a pixel at 64 px and the pooling / mask decoder would see nothing;
# above 1 it covers the whole image and carries no location. (Not in the config yet: see report.)
MIN_POSITION_SIZE = 0.02
MAX_POSITION_SIZE = 1.0


def binarize(x: torch.Tensor, training: bool) -> torch.Tensor:
    """Sigmoid, plus in training the noise ``s + s(1 - s) N(0, 1)`` (paper table 8 / Loci).

    The noise is largest at ``s = 0.5`` and vanishes at 0 and 1, which pushes the code towards
    binary values that survive the noise. Eval mode is the deterministic sigmoid (contract).

    Shapes: any -> same.
    """
    s = torch.sigmoid(x)
    if training:
        s = s + s * (1 - s) * torch.randn_like(s)
    return s


class HyperConvNeXtBlock(ConvNeXtBlock):
    """ConvNeXt block whose depth-wise kernel is ``shared kernel + hypernetwork(gestalt_prior)``.

    The hypernetwork ``G -> hyper_hidden -> in_channels * k * k`` has a zero-initialised last
    layer, so the block starts out as a plain :class:`ConvNeXtBlock` (stage 1 of the paper's
    training pipeline) and the top-down residual grows only as far as it helps.

    The per-sample kernels run as ONE grouped convolution: the N samples are folded into the
    channel axis (``[1, N * C, H, W]`` with ``groups = N * C``), so there is no Python loop over
    slots and each sample only ever sees its own kernel (rows stay independent).

    Shapes: ``x [N, in_channels, H, W], gestalt_prior [N, G] -> [N, out_channels, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, gestalt_dim: int,
                 hyper_hidden: int, kernel_size: int = 7) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size)
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        self.hypernetwork = nn.Sequential(
            nn.Linear(gestalt_dim, hyper_hidden),
            nn.SiLU(),
            nn.Linear(hyper_hidden, in_channels * kernel_size * kernel_size),
        )
        nn.init.zeros_(self.hypernetwork[-1].weight)
        nn.init.zeros_(self.hypernetwork[-1].bias)

    def forward(self, x: torch.Tensor, gestalt_prior: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        k = self.kernel_size
        residual = self.hypernetwork(gestalt_prior.to(x.dtype)).view(n, c, k, k)
        weight = (self.depthwise.weight.view(1, c, k, k) + residual).reshape(n * c, 1, k, k)
        bias = self.depthwise.bias.repeat(n) if self.depthwise.bias is not None else None
        out = F.conv2d(x.reshape(1, n * c, h, w), weight, bias, padding=k // 2, groups=n * c)
        return self.residual(x, out.view(n, c, h, w))


class HyperSequential(nn.ModuleList):
    """A chain of :class:`HyperConvNeXtBlock` that all receive the same ``gestalt_prior``.

    Shapes: ``x [N, C, H, W], gestalt_prior [N, G] -> [N, C', H, W]`` (identity when empty).
    """

    def forward(self, x: torch.Tensor, gestalt_prior: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, gestalt_prior)
        return x


class FeaturesMapToPosition(nn.Module):
    """4-channel map -> position code ``(x, y, size, priority)``. Parameter-free.

    - channel 0: spatial logits; their softmax is an attention map whose expected coordinate
      (soft-argmax) gives ``x, y`` in ``[-1, 1]`` (x right, y down, pixel centres at the ends).
    - channel 1: attention-weighted mean -> size through ``min + (max - min) * sigmoid`` (a smooth
      bounded map, so the size never loses its gradient the way a hard clamp would).
    - channel 2: attention-weighted mean (the depth ordering *at* the object) plus channel 3's global
      mean (scene context, e.g. a slot that sees nothing) -> unbounded priority.

    Shapes: ``[N, 4, h, w] -> [N, 4]``.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, _, h, w = features.shape
        attention = torch.softmax(features[:, 0].reshape(n, h * w), dim=1).view(n, h, w)
        grid = coordinate_grid(h, w, device=features.device, dtype=features.dtype)
        x = (attention * grid[0]).sum(dim=(1, 2))
        y = (attention * grid[1]).sum(dim=(1, 2))
        size_logit = (attention * features[:, 1]).sum(dim=(1, 2))
        size = MIN_POSITION_SIZE + (MAX_POSITION_SIZE - MIN_POSITION_SIZE) * torch.sigmoid(size_logit)
        priority = (attention * features[:, 2]).sum(dim=(1, 2)) + features[:, 3].mean(dim=(1, 2))
        return torch.stack([x, y, size, priority], dim=1)


class PositionPooling(nn.Module):
    """Gaussian-weighted average of a feature map around the predicted position. Parameter-free.

    ``pooled = (sum_hw f * g + mean_hw f) / (sum_hw g + 1)`` with ``g`` the (peak-1) Gaussian of the
    position: the global mean enters with the weight of one pixel, a fallback that keeps the code
    defined (and the gradient alive) when the Gaussian is narrow or falls off the grid.

    Shapes: ``features [N, C, h, w], position [N, 4] -> [N, C]``.
    """

    def forward(self, features: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        g = gaussian_heatmap(position.to(features.dtype), h, w)
        weighted = torch.einsum("nchw,nhw->nc", features, g)
        return (weighted + features.mean(dim=(2, 3))) / (g.sum(dim=(1, 2))[:, None] + 1.0)


class GestaltHead(nn.Module):
    """One Gestalt head (mask, depth or RGB part; table 4).

    Stride-2 residual patch embedding -> Hyper-ConvNeXt blocks -> position pooling -> linear to
    ``gestalt_size`` logits (binarised by the encoder).

    Shapes: ``x [N, C_base, h, w], gestalt_prior [N, G], position [N, 4] -> [N, gestalt_size]``.
    """

    def __init__(self, in_channels: int, channels: int, blocks: int, gestalt_size: int, *,
                 gestalt_dim: int, hyper_hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.embedding = ResidualPatchEmbedding(in_channels, channels, 2)
        self.blocks = HyperSequential(
            HyperConvNeXtBlock(channels, gestalt_dim=gestalt_dim, hyper_hidden=hyper_hidden,
                               kernel_size=kernel_size) for _ in range(blocks))
        self.pooling = PositionPooling()
        self.to_code = nn.Linear(channels, gestalt_size)

    def forward(self, x: torch.Tensor, gestalt_prior: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embedding(x), gestalt_prior)
        return self.to_code(self.pooling(x, position))


class HyperConvNeXtEncoder(nn.Module):
    """Slot-wise encoder of table 4, scaled by ``config.encoder``.

    Base: per stage a :class:`ResidualPatchEmbedding` (``stage_channels`` / ``stage_strides``) and
    ``stage_blocks`` Hyper-ConvNeXt blocks. Position head: ``position_blocks`` blocks, the last
    mapping to 4 channels, then :class:`FeaturesMapToPosition`. Gestalt: ``gestalt_base_blocks``
    shared blocks, then three :class:`GestaltHead` (mask, depth, RGB), each binarised.

    Shapes: ``inputs [N, config.encoder_in_channels, H, W], gestalt_prior [N, G] ->
    (position [N, 4], gestalt [N, G])`` with ``G = 3 * config.gestalt_size`` (mask | depth | RGB).
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        enc = config.encoder
        if not (len(enc.stage_channels) == len(enc.stage_strides) == len(enc.stage_blocks)):
            raise ValueError(f"encoder.stage_channels / stage_strides / stage_blocks must have the same "
                             f"length, actual values: {enc.stage_channels}, {enc.stage_strides}, "
                             f"{enc.stage_blocks}")
        if enc.position_blocks < 1:
            raise ValueError(f"encoder.position_blocks must be >= 1 (the last maps to 4 channels), "
                             f"actual value: {enc.position_blocks}")
        self.in_channels = config.encoder_in_channels
        self.gestalt_dim = config.gestalt_dim
        hyper = dict(gestalt_dim=config.gestalt_dim, hyper_hidden=enc.hyper_hidden, kernel_size=enc.kernel_size)

        self.embeddings = nn.ModuleList()
        self.stages = nn.ModuleList()
        channels = self.in_channels
        for out_channels, stride, blocks in zip(enc.stage_channels, enc.stage_strides, enc.stage_blocks):
            self.embeddings.append(ResidualPatchEmbedding(channels, out_channels, stride))
            self.stages.append(HyperSequential(HyperConvNeXtBlock(out_channels, **hyper) for _ in range(blocks)))
            channels = out_channels

        self.position_blocks = HyperSequential(
            [HyperConvNeXtBlock(channels, **hyper) for _ in range(enc.position_blocks - 1)]
            + [HyperConvNeXtBlock(channels, 4, **hyper)])
        self.to_position = FeaturesMapToPosition()

        self.gestalt_base = HyperSequential(HyperConvNeXtBlock(channels, **hyper)
                                            for _ in range(enc.gestalt_base_blocks))
        self.gestalt_heads = nn.ModuleList(
            GestaltHead(channels, enc.gestalt_channels, enc.gestalt_blocks, config.gestalt_size, **hyper)
            for _ in range(3))  # mask, depth, RGB: the order of the Gestalt code

    def forward(self, inputs: torch.Tensor, gestalt_prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.dim() != 4 or inputs.shape[1] != self.in_channels:
            raise ValueError(f"inputs: expected [N, {self.in_channels}, H, W], actual shape: {tuple(inputs.shape)}")
        if gestalt_prior.shape != (inputs.shape[0], self.gestalt_dim):
            raise ValueError(f"gestalt_prior: expected [{inputs.shape[0]}, {self.gestalt_dim}], actual "
                             f"shape: {tuple(gestalt_prior.shape)}")
        x = inputs
        for embedding, blocks in zip(self.embeddings, self.stages):
            x = blocks(embedding(x), gestalt_prior)
        position = self.to_position(self.position_blocks(x, gestalt_prior))
        base = self.gestalt_base(x, gestalt_prior)
        gestalt = torch.cat([binarize(head(base, gestalt_prior, position), self.training)
                             for head in self.gestalt_heads], dim=1)
        return position, gestalt
