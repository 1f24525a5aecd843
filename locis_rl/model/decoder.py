"""Cascaded mask -> depth -> RGB slot decoder and priority-based composition (section 3.3, table 6).

The Gestalt code is split into mask | depth | RGB parts. The mask decoder spatialises its part with
a Gaussian heatmap of the position; the depth decoder sees the (sigmoid) mask, the RGB decoder the
mask and the decoded depth. Only the mask decoder is needed for occlusion-aware masks, which is why
:meth:`CascadedDecoder.decode_mask` runs it alone.

Widths follow table 6 scaled by ``config.decoder``; every internal "x4" width of the table
(mask / depth encoders 1 -> 128 -> 32 and 1 -> 256 -> 64, heads 64 -> 256, 128 -> 512) is
``4 x`` the configured width. Latent grid: ``image_size // patch_size``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from locis_rl.model.blocks import ConvNeXtBlock, PatchConvTranspose2d, coordinate_grid, gaussian_heatmap
from locis_rl.model.config import LociSConfig

__all__ = [
    "MaskDecoder",
    "PatchEncoder",
    "PositionalEmbedding",
    "AppearanceDecoder",
    "DepthDecoder",
    "RGBDecoder",
    "CascadedDecoder",
    "compose",
]

# Width multiplier of the table's hidden layers (MaskEncoder 1 -> 128 -> 32, heads C -> 4C).
_EXPANSION = 4
# Relative offsets (grid - xy) / size saturate softly at this value: a slot of size 0.02 would
# otherwise feed offsets of +-100 into the decoder.
_MAX_RELATIVE_OFFSET = 4.0
# Smallest size used to normalise offsets (same floor as gaussian_heatmap's std clamp x10).
_MIN_SIZE = 1e-2


class MaskDecoder(nn.Module):
    """Gestalt mask part x Gaussian heatmap ("GestaltPositionFusion") -> 3x3 convs -> 1x1 ->
    ``ConvTranspose2d(kernel = stride = patch_size)`` to unoccluded mask logits.

    Shapes: ``position [N, 4], gestalt_mask [N, gestalt_size] -> [N, 1, H, W]`` logits.
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        dec = config.decoder
        self.latent_size = config.image_size // dec.patch_size
        layers: list[nn.Module] = []
        channels = config.gestalt_size
        for width in dec.mask_channels:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU()]
            channels = width
        layers.append(nn.Conv2d(channels, dec.mask_latent, 1))
        self.body = nn.Sequential(*layers)
        self.upscale = PatchConvTranspose2d(dec.mask_latent, 1, dec.patch_size)

    def forward(self, position: torch.Tensor, gestalt_mask: torch.Tensor) -> torch.Tensor:
        s = self.latent_size
        heatmap = gaussian_heatmap(position.to(gestalt_mask.dtype), s, s)[:, None]
        fused = gestalt_mask[:, :, None, None] * heatmap
        return self.upscale(self.body(fused))


class PatchEncoder(nn.Module):
    """Full-resolution 1-channel map -> latent features (table 6 "MaskEncoder" / "DepthEncoder").

    ``Conv2d(1, 4C, patch, stride=patch) -> SiLU -> Conv2d(4C, C, 1)``.

    Shapes: ``[N, 1, H, W] -> [N, C, H / patch, W / patch]``.
    """

    def __init__(self, channels: int, patch_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, _EXPANSION * channels, patch_size, stride=patch_size),
            nn.SiLU(),
            nn.Conv2d(_EXPANSION * channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PositionalEmbedding(nn.Module):
    """Learned embedding of the position relative to the slot: ``(grid - xy) / size`` (softly
    saturated) and the position code ``(x, y, size, tanh(priority))`` broadcast over the grid ->
    1x1 conv -> SiLU. Priority is squashed because it is unbounded by contract.

    Shapes: ``position [N, 4] -> [N, channels, size, size]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(6, channels, 1)

    def forward(self, position: torch.Tensor, size: int) -> torch.Tensor:
        n = position.shape[0]
        grid = coordinate_grid(size, size, device=position.device, dtype=position.dtype)
        scale = position[:, 2, None, None, None].clamp_min(_MIN_SIZE)
        offset = (grid[None] - position[:, :2, None, None]) / scale
        offset = _MAX_RELATIVE_OFFSET * torch.tanh(offset / _MAX_RELATIVE_OFFSET)
        code = torch.cat([position[:, :3], torch.tanh(position[:, 3:4])], dim=1)
        code = code[:, :, None, None].expand(n, 4, size, size)
        return F.silu(self.project(torch.cat([offset, code], dim=1)))


class AppearanceDecoder(nn.Module):
    """Shared body of the depth and RGB decoders (table 6).

    ``[Gestalt part * MaxPool(mask, patch) ("GestaltMaskFusion") | MaskEncoder(mask) |
    DepthEncoder(depth) (RGB only) | PositionalEmbedding] -> 1x1 conv -> ConvNeXt blocks -> 1x1 (x4)
    -> SiLU -> ConvTranspose2d(kernel = stride = patch) -> sigmoid``.

    Shapes: ``position [N, 4], gestalt_part [N, gestalt_size], mask [N, 1, H, W] in [0, 1],
    depth [N, 1, H, W] (only with ``use_depth_input``) -> [N, out_channels, H, W]`` in ``(0, 1)``.
    """

    def __init__(self, config: LociSConfig, *, channels: int, blocks: int, out_channels: int,
                 use_depth_input: bool) -> None:
        super().__init__()
        dec = config.decoder
        self.patch_size = dec.patch_size
        self.latent_size = config.image_size // dec.patch_size
        self.mask_encoder = PatchEncoder(dec.mask_embedding, dec.patch_size)
        self.depth_encoder = PatchEncoder(dec.depth_embedding, dec.patch_size) if use_depth_input else None
        self.position_embedding = PositionalEmbedding(dec.position_embedding)
        fused = (config.gestalt_size + dec.mask_embedding + dec.position_embedding
                 + (dec.depth_embedding if use_depth_input else 0))
        self.fuse = nn.Conv2d(fused, channels, 1)
        self.blocks = nn.Sequential(*(ConvNeXtBlock(channels) for _ in range(blocks)))
        self.head = nn.Sequential(
            nn.Conv2d(channels, _EXPANSION * channels, 1),
            nn.SiLU(),
            PatchConvTranspose2d(_EXPANSION * channels, out_channels, dec.patch_size),
        )

    def forward(self, position: torch.Tensor, gestalt_part: torch.Tensor, mask: torch.Tensor,
                depth: torch.Tensor | None = None) -> torch.Tensor:
        # Max-pooling keeps a latent cell "on" if any of its pixels belongs to the object, so thin
        # parts still receive the Gestalt code (the masked outline of section 3.3).
        modulated = gestalt_part[:, :, None, None] * F.max_pool2d(mask, self.patch_size)
        features = [modulated, self.mask_encoder(mask)]
        if self.depth_encoder is not None:
            if depth is None:
                raise ValueError("this decoder needs the decoded depth [N, 1, H, W]")
            features.append(self.depth_encoder(depth))
        features.append(self.position_embedding(position, self.latent_size))
        x = self.blocks(self.fuse(torch.cat(features, dim=1)))
        return torch.sigmoid(self.head(x))


class DepthDecoder(AppearanceDecoder):
    """Depth part of the cascade: ``(position, gestalt_depth, mask) -> depth [N, 1, H, W]`` in (0, 1)
    (scene-relative units, near ~ 1)."""

    def __init__(self, config: LociSConfig) -> None:
        dec = config.decoder
        super().__init__(config, channels=dec.depth_channels, blocks=dec.depth_blocks, out_channels=1,
                         use_depth_input=False)


class RGBDecoder(AppearanceDecoder):
    """RGB part of the cascade: ``(position, gestalt_rgb, mask, depth) -> rgb [N, 3, H, W]`` in (0, 1)."""

    def __init__(self, config: LociSConfig) -> None:
        dec = config.decoder
        super().__init__(config, channels=dec.rgb_channels, blocks=dec.rgb_blocks, out_channels=3,
                         use_depth_input=True)


class CascadedDecoder(nn.Module):
    """Slot-wise cascaded decoder: mask, then depth (given the mask), then RGB (given both).

    Shapes: ``position [N, 4], gestalt [N, 3 * gestalt_size]`` (mask | depth | RGB) ->
    ``dict(mask_logits [N, 1, H, W], depth [N, 1, H, W] in (0, 1), rgb [N, 3, H, W] in (0, 1))``.
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        self.gestalt_size = config.gestalt_size
        self.temperature = config.decoder.occlusion_temperature
        self.mask_decoder = MaskDecoder(config)
        self.depth_decoder = DepthDecoder(config)
        self.rgb_decoder = RGBDecoder(config)

    def _split(self, gestalt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if gestalt.dim() != 2 or gestalt.shape[1] != 3 * self.gestalt_size:
            raise ValueError(f"gestalt: expected [N, {3 * self.gestalt_size}], actual shape: "
                             f"{tuple(gestalt.shape)}")
        return gestalt.split(self.gestalt_size, dim=1)

    def decode_mask(self, position: torch.Tensor, gestalt: torch.Tensor) -> torch.Tensor:
        """Unoccluded object mask logits ``[N, 1, H, W]``; runs the mask decoder only."""
        return self.mask_decoder(position, self._split(gestalt)[0])

    def forward(self, position: torch.Tensor, gestalt: torch.Tensor, rgb: bool = True) -> dict[str, torch.Tensor]:
        """``rgb=False`` stops the cascade after depth (no ``rgb`` key): RGB is its last stage,
        so mask and depth are the same either way."""
        g_mask, g_depth, g_rgb = self._split(gestalt)
        mask_logits = self.mask_decoder(position, g_mask)
        mask = torch.sigmoid(mask_logits)
        depth = self.depth_decoder(position, g_depth, mask)
        out = {"mask_logits": mask_logits, "depth": depth}
        if rgb:
            out["rgb"] = self.rgb_decoder(position, g_rgb, mask, depth)
        return out

    def compose(self, mask_logits: torch.Tensor, priority: torch.Tensor, presence: torch.Tensor,
                slot_rgb: torch.Tensor | None, slot_depth: torch.Tensor, background_rgb: torch.Tensor,
                background_depth: torch.Tensor, temperature: float | None = None) -> dict[str, torch.Tensor]:
        """:func:`compose` with ``config.decoder.occlusion_temperature`` as the default temperature."""
        return compose(mask_logits, priority, presence, slot_rgb, slot_depth, background_rgb,
                       background_depth, self.temperature if temperature is None else temperature)


def compose(mask_logits: torch.Tensor, priority: torch.Tensor, presence: torch.Tensor,
            slot_rgb: torch.Tensor | None, slot_depth: torch.Tensor, background_rgb: torch.Tensor,
            background_depth: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Priority-ordered occlusion and composition of K slots over a background.

    ``m_k = sigmoid(mask_logits_k) * presence_k`` and
    ``visible_k = m_k * prod_{j != k} (1 - m_j * sigmoid((prio_j - prio_k) / temperature))``:
    slot ``j`` hides slot ``k`` where ``j`` is present, covers the pixel and is in front (higher
    priority). Vectorised over a ``[B, K, K, H, W]`` occluder tensor (no loops). The background
    takes the rest; as a guard for soft orderings of K > 2 slots (where the object masses can
    exceed 1) all K + 1 masks are renormalised, so they sum to 1 exactly.

    Args:
        mask_logits: ``[B, K, 1, H, W]`` unoccluded mask logits.
        priority: ``[B, K]`` (larger = closer). presence: ``[B, K]`` in ``[0, 1]`` (0 = absent slot).
        slot_rgb: ``[B, K, 3, H, W]``, or ``None`` (no ``rgb`` in the result); slot_depth:
            ``[B, K, 1, H, W]``.
        background_rgb: ``[B, 3, H, W]``; background_depth: ``[B, 1, H, W]``.
        temperature: softness of the ordering (> 0; smaller = harder).

    Returns:
        dict(masks ``[B, K+1, H, W]`` visible masks, background last, summing to 1;
        object_masks ``[B, K, H, W]`` the unoccluded masks ``m_k`` (presence applied);
        rgb ``[B, 3, H, W]``; depth ``[B, 1, H, W]``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, actual value: {temperature}")
    b, k = priority.shape
    dtype = mask_logits.dtype
    objects = torch.sigmoid(mask_logits[:, :, 0]) * presence.to(dtype)[:, :, None, None]  # [B, K, H, W]
    # front[b, j, k] = probability that slot j is in front of slot k; the diagonal is zeroed so a
    # slot never occludes itself.
    front = torch.sigmoid((priority[:, :, None] - priority[:, None, :]).to(dtype) / temperature)
    front = front * (1 - torch.eye(k, device=front.device, dtype=dtype))
    occluders = 1 - objects[:, :, None] * front[:, :, :, None, None]  # [B, J, K, H, W]
    visible = objects * occluders.prod(dim=1)  # [B, K, H, W]
    background = (1 - visible.sum(dim=1, keepdim=True)).clamp_min(0)
    masks = torch.cat([visible, background], dim=1)
    masks = masks / masks.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    depth = torch.einsum("bkhw,bkchw->bchw", masks[:, :k], slot_depth) + masks[:, k:] * background_depth
    out = {"masks": masks, "object_masks": objects, "depth": depth}
    if slot_rgb is not None:
        out["rgb"] = torch.einsum("bkhw,bkchw->bchw", masks[:, :k], slot_rgb) + masks[:, k:] * background_rgb
    return out
