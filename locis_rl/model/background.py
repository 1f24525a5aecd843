"""Background module (section 3.4, table 8): uncertainty U-Net + masked-autoencoder ViT.

The background module is trained before the slotted parts of Loci-s:

* :class:`UncertaintyNet` - a U-Net of residual patch (un)embeddings and ConvNeXt blocks that
  predicts a foreground ("uncertainty") logit map from RGB or RGB + scene-relative depth.
* :class:`BackgroundExtractor` - a masked autoencoder: a ViT whose tokens covering foreground are
  masked out as attention keys (static shapes, no gathering), an RGB branch and a depth branch. The
  background depth passes through a narrow binarised bottleneck (``background.depth_bottleneck``
  units), so it can only carry coarse geometry (a floor plane, a wall), never object shapes.
* :class:`BackgroundModule` - both, plus the two training losses.

:func:`median_background_foreground` gives a label-free foreground target for videos without
segmentation (temporal median background).

Every row of the batch is independent (per-sample LayerNorm, attention within a row only);
the only stochastic part is the bottleneck binarisation noise, active only in training.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvNeXtBlock, PatchConvTranspose2d, ResidualPatchEmbedding, ResidualPatchUpscaling
from .config import LociSConfig

__all__ = [
    "UncertaintyNet",
    "BackgroundExtractor",
    "BackgroundModule",
    "uncertainty_loss",
    "background_reconstruction_loss",
    "median_background_foreground",
]

# Fixed sizes of table 8 that have no config field (kept as constants, scaled by vit_dim).
PATCH_HIDDEN_FACTOR = 4
"""Hidden width of the patch (un)embeddings = factor x vit_dim (table 8: 256 for vit_dim 64)."""
UNCERTAINTY_BOTTOM_BLOCKS = 2
"""ConvNeXt blocks at the deepest U-Net level (table 8: two 128 -> 128 blocks)."""
DEPTH_DECODER_BLOCKS = 2
"""ConvNeXt blocks of the depth decoder before its patch up-scaling (table 8)."""
RGB_DECODER_BLOCKS_BEFORE = 1
RGB_DECODER_BLOCKS_AFTER = 2
"""ConvNeXt blocks of the RGB decoder before / after its cross-attention layer (table 8)."""
MLP_RATIO = 4
"""Width of the transformer feed-forward layers relative to vit_dim."""


# --------------------------------------------------------------------------------------------
# Uncertainty U-Net
# --------------------------------------------------------------------------------------------
class UncertaintyNet(nn.Module):
    """Foreground / uncertainty U-Net (table 8, scaled by ``config.background``).

    Down path: per level a :class:`ResidualPatchEmbedding` (``uncertainty_strides[i]``) and a
    ConvNeXt block (the deepest level has :data:`UNCERTAINTY_BOTTOM_BLOCKS`). Up path: per level a
    :class:`ResidualPatchUpscaling`, the skip of the matching down level **added**, and a ConvNeXt
    block; the last up-scaling (stride ``uncertainty_strides[0]``) maps to 1 channel of logits.

    Shapes: ``forward(image [B, C, H, W]) -> foreground_logits [B, 1, H, W]`` with
    ``C = config.image_channels``; ``H, W`` divisible by the product of the strides.
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        bg = config.background
        channels, strides = tuple(bg.uncertainty_channels), tuple(bg.uncertainty_strides)
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"background.uncertainty_channels and uncertainty_strides must have the "
                             f"same non-zero length, actual values: {channels}, {strides}")
        self.strides = strides
        self.down = nn.ModuleList()
        in_ch = config.image_channels
        for level, (ch, stride) in enumerate(zip(channels, strides)):
            blocks = UNCERTAINTY_BOTTOM_BLOCKS if level == len(channels) - 1 else 1
            self.down.append(nn.Sequential(ResidualPatchEmbedding(in_ch, ch, stride),
                                           *[ConvNeXtBlock(ch) for _ in range(blocks)]))
            in_ch = ch
        self.up_scale = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in range(len(channels) - 1, 0, -1):
            self.up_scale.append(ResidualPatchUpscaling(channels[level], channels[level - 1], strides[level]))
            self.up_blocks.append(ConvNeXtBlock(channels[level - 1]))
        self.head = ResidualPatchUpscaling(channels[0], 1, strides[0])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = image
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        skips.pop()  # the deepest level is ``x`` itself
        for scale, block in zip(self.up_scale, self.up_blocks):
            x = block(scale(x) + skips.pop())
        return self.head(x)


# --------------------------------------------------------------------------------------------
# Transformer pieces (own implementation: boolean key masks, no fast-path surprises in eval)
# --------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """Multi-head attention of queries ``x [B, Tq, D]`` over ``context [B, Tk, D]``.

    ``key_keep [B, Tk]`` (bool, True = may be attended) masks keys; every row must keep one key.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                key_keep: torch.Tensor | None = None) -> torch.Tensor:
        b, tq, d = x.shape
        tk = context.shape[1]
        h = self.heads
        q = self.q(x).view(b, tq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, tk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_keep is None else key_keep[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, tq, d))


class _TransformerLayer(nn.Module):
    """Pre-norm transformer layer: (cross- or self-) attention + MLP, both residual.

    ``forward(x [B,T,D], context [B,Tk,D] | None (= self-attention), key_keep [B,Tk] | None)``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.SiLU(), nn.Linear(MLP_RATIO * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_keep: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        kv = self.norm_kv(x if context is None else context)
        x = x + self.attn(q, kv, key_keep)
        return x + self.mlp(self.norm_mlp(x))


class _PatchEmbedding(nn.Sequential):
    """Conv(k = stride = patch) ``in -> hidden`` -> SiLU -> 1x1 ``hidden -> dim``: ``[B,C,H,W] -> [B,dim,H/p,W/p]``."""

    def __init__(self, in_channels: int, hidden: int, dim: int, patch: int) -> None:
        super().__init__(nn.Conv2d(in_channels, hidden, patch, stride=patch), nn.SiLU(),
                         nn.Conv2d(hidden, dim, 1))


class _PatchUpscaling(nn.Sequential):
    """1x1 ``dim -> hidden`` -> SiLU -> ConvTranspose(k = stride = patch) ``hidden -> out``: ``[B,dim,h,w] -> [B,out,h*p,w*p]``."""

    def __init__(self, dim: int, hidden: int, out_channels: int, patch: int) -> None:
        super().__init__(nn.Conv2d(dim, hidden, 1), nn.SiLU(),
                         PatchConvTranspose2d(hidden, out_channels, patch))


def _binarize(x: torch.Tensor, training: bool) -> torch.Tensor:
    """``x`` in (0, 1) -> ``x + x (1 - x) N(0, 1)`` in training, ``x`` unchanged in eval."""
    if not training:
        return x
    return x + x * (1 - x) * torch.randn_like(x)


# --------------------------------------------------------------------------------------------
# Background extractor (masked autoencoder ViT)
# --------------------------------------------------------------------------------------------
class BackgroundExtractor(nn.Module):
    """Masked-autoencoder ViT that reconstructs the background RGB and depth (table 8).

    Pipeline (``D = vit_dim``, ``p = vit_patch``, ``T = (H/p) (W/p)`` tokens):

    1. ``image * (1 - foreground)`` -> patch embedding (``C -> 4D -> SiLU -> D``) + learned
       positional embedding -> tokens ``[B, T, D]``.
    2. MAE masking with static shapes: a token is *masked* when the mean foreground probability of
       its patch exceeds ``uncertainty_threshold``; its input is replaced by a learned mask token
       and it is excluded as an attention **key** in every encoder layer (it still queries, so it
       receives an in-painted background estimate from the visible tokens only). The
       least-foreground token of each row is always kept, so no attention row is empty (no NaN
       even for a fully foreground frame). After the encoders no token carries foreground content,
       so the bottleneck and the RGB decoder's cross-attention read all tokens (MAE: the masked
       positions' predictions are what fills the background behind objects).
    3. Base encoder (``vit_base_layers``), then an RGB encoder (``vit_rgb_layers``) and a depth
       encoder (``vit_depth_layers``) on the base tokens.
    4. Depth bottleneck: token average + cross-attention of one learned query to the depth
       tokens -> linear to ``depth_bottleneck`` units -> sigmoid -> binarise
       (``x + x(1-x)N(0,1)`` in training).
    5. Depth decoder: bottleneck -> linear to ``D``, broadcast over the token grid + positional
       embedding -> ConvNeXt blocks -> patch up-scaling -> sigmoid depth ``[B,1,H,W]``.
    6. RGB decoder: patch embedding of the predicted depth (``1 -> D``) + positional embedding ->
       ConvNeXt -> cross-attention to the RGB encoder tokens -> ConvNeXt blocks ->
       patch up-scaling -> sigmoid RGB ``[B,3,H,W]``.

    ``forward(image [B,C,H,W], foreground [B,1,H,W] in [0,1]) -> dict(rgb [B,3,H,W],
    depth [B,1,H,W], depth_code [B, depth_bottleneck], token_keep [B, T] bool)``.
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        bg = config.background
        dim, heads, patch = bg.vit_dim, bg.vit_heads, bg.vit_patch
        if config.image_size % patch:
            raise ValueError(f"image_size must be divisible by background.vit_patch ({patch}), "
                             f"actual value: {config.image_size}")
        hidden = PATCH_HIDDEN_FACTOR * dim
        self.patch = patch
        self.grid = config.image_size // patch
        self.threshold = bg.uncertainty_threshold
        tokens = self.grid * self.grid

        self.embed = _PatchEmbedding(config.image_channels, hidden, dim, patch)
        self.pos_encoder = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pos_depth = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pos_rgb = nn.Parameter(torch.zeros(1, tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.base_layers = nn.ModuleList(_TransformerLayer(dim, heads) for _ in range(bg.vit_base_layers))
        self.rgb_layers = nn.ModuleList(_TransformerLayer(dim, heads) for _ in range(bg.vit_rgb_layers))
        self.depth_layers = nn.ModuleList(_TransformerLayer(dim, heads) for _ in range(bg.vit_depth_layers))

        # narrow bottleneck
        self.bottleneck_query = nn.Parameter(torch.zeros(1, 1, dim))
        self.bottleneck_attn = _TransformerLayer(dim, heads)
        self.bottleneck_norm = nn.LayerNorm(dim)
        self.to_code = nn.Linear(dim, bg.depth_bottleneck)
        self.from_code = nn.Linear(bg.depth_bottleneck, dim)

        self.depth_blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(DEPTH_DECODER_BLOCKS)])
        self.depth_out = _PatchUpscaling(dim, hidden, 1, patch)

        self.depth_embed = _PatchEmbedding(1, hidden, dim, patch)
        self.rgb_blocks_before = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(RGB_DECODER_BLOCKS_BEFORE)])
        self.rgb_cross = _TransformerLayer(dim, heads)
        self.rgb_blocks_after = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(RGB_DECODER_BLOCKS_AFTER)])
        self.rgb_out = _PatchUpscaling(dim, hidden, 3, patch)

        for p in (self.pos_encoder, self.pos_depth, self.pos_rgb, self.mask_token, self.bottleneck_query):
            nn.init.trunc_normal_(p, std=0.02)

    @property
    def depth_bottleneck(self) -> int:
        """Width of the binarised depth bottleneck (= ``config.background.depth_bottleneck``)."""
        return self.to_code.out_features

    def token_keep(self, foreground: torch.Tensor) -> torch.Tensor:
        """``foreground [B,1,H,W] -> keep [B,T]`` bool: True where the patch's mean foreground is
        at most the threshold; the least-foreground token of each row is always kept."""
        fraction = F.avg_pool2d(foreground, self.patch).flatten(1)
        keep = fraction <= self.threshold
        least = fraction.argmin(dim=1, keepdim=True)
        return keep.scatter(1, least, True)

    def _to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)

    @staticmethod
    def _to_tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)

    def encode_depth(self, depth_tokens: torch.Tensor) -> torch.Tensor:
        """Bottleneck: ``depth_tokens [B,T,D] -> code [B, depth_bottleneck]`` in (0,1) (binarised in training)."""
        average = depth_tokens.mean(1, keepdim=True)
        query = self.bottleneck_query.expand(depth_tokens.shape[0], -1, -1) + average
        pooled = self.bottleneck_attn(query, depth_tokens)
        code = torch.sigmoid(self.to_code(self.bottleneck_norm(pooled.squeeze(1))))
        return _binarize(code, self.training)

    def decode_depth(self, code: torch.Tensor) -> torch.Tensor:
        """``code [B, depth_bottleneck] -> depth [B,1,H,W]`` in (0,1)."""
        tokens = self.from_code(code).unsqueeze(1) + self.pos_depth
        x = self.depth_blocks(self._to_map(tokens))
        return torch.sigmoid(self.depth_out(x))

    def decode_rgb(self, depth: torch.Tensor, rgb_tokens: torch.Tensor) -> torch.Tensor:
        """``depth [B,1,H,W], rgb_tokens [B,T,D] -> rgb [B,3,H,W]`` in (0,1)."""
        x = self.rgb_blocks_before(self.depth_embed(depth) + self._to_map(self.pos_rgb))
        x = self._to_map(self.rgb_cross(self._to_tokens(x), rgb_tokens))
        return torch.sigmoid(self.rgb_out(self.rgb_blocks_after(x)))

    def forward(self, image: torch.Tensor, foreground: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = self.token_keep(foreground)
        tokens = self._to_tokens(self.embed(image * (1 - foreground)))
        tokens = torch.where(keep.unsqueeze(-1), tokens, self.mask_token.to(tokens.dtype))
        tokens = tokens + self.pos_encoder
        for layer in self.base_layers:
            tokens = layer(tokens, None, keep)
        rgb_tokens = tokens
        for layer in self.rgb_layers:
            rgb_tokens = layer(rgb_tokens, None, keep)
        depth_tokens = tokens
        for layer in self.depth_layers:
            depth_tokens = layer(depth_tokens, None, keep)
        code = self.encode_depth(depth_tokens)
        depth = self.decode_depth(code)
        rgb = self.decode_rgb(depth, rgb_tokens)
        return {"rgb": rgb, "depth": depth, "depth_code": code, "token_keep": keep}


# --------------------------------------------------------------------------------------------
# Losses and label-free targets
# --------------------------------------------------------------------------------------------
def uncertainty_loss(foreground_logits: torch.Tensor, foreground_target: torch.Tensor,
                     pos_weight: float | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits of the uncertainty net.

    Args:
        foreground_logits: ``[B,1,H,W]``.
        foreground_target: ``[B,1,H,W]`` float in ``[0, 1]`` (1 = foreground).
        pos_weight: optional weight of the foreground (positive) term, e.g. the background /
            foreground pixel ratio for scenes with small objects.

    Returns:
        scalar mean loss.
    """
    weight = None
    if pos_weight is not None:
        weight = torch.as_tensor(pos_weight, device=foreground_logits.device, dtype=foreground_logits.dtype)
    return F.binary_cross_entropy_with_logits(foreground_logits, foreground_target.to(foreground_logits.dtype),
                                              pos_weight=weight)


def background_reconstruction_loss(pred_rgb: torch.Tensor, pred_depth: torch.Tensor,
                                   target_rgb: torch.Tensor, target_depth: torch.Tensor | None,
                                   foreground_target: torch.Tensor) -> torch.Tensor:
    """Squared error on background pixels only (the inverse foreground mask), section 3.4.

    Args:
        pred_rgb, target_rgb: ``[B,3,H,W]``. pred_depth, target_depth: ``[B,1,H,W]``
            (``target_depth`` None = RGB-only data; the depth term is then skipped).
        foreground_target: ``[B,1,H,W]`` in ``[0,1]``; the weight of a pixel is ``1 - fg``.

    Returns:
        scalar: RGB MSE (mean over channels) + depth MSE, each normalised by the (soft) count of
        background pixels in the batch (at least 1).
    """
    weight = (1 - foreground_target).to(pred_rgb.dtype)
    count = weight.sum().clamp_min(1.0)
    loss = ((pred_rgb - target_rgb).pow(2).mean(1, keepdim=True) * weight).sum() / count
    if target_depth is not None:
        loss = loss + ((pred_depth - target_depth).pow(2) * weight).sum() / count
    return loss


def median_background_foreground(frames: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Label-free foreground target: pixels that deviate from the temporal median background.

    Args:
        frames: ``[T,3,H,W]`` or ``[B,T,3,H,W]`` RGB in ``[0,1]`` from a static camera.
        threshold: a pixel is foreground when its largest per-channel absolute deviation from the
            per-pixel temporal median exceeds this.

    Returns:
        ``[T,1,H,W]`` or ``[B,T,1,H,W]`` float mask (1 = foreground).
    """
    if frames.dim() not in (4, 5):
        raise ValueError(f"frames must be [T,3,H,W] or [B,T,3,H,W], actual shape: {tuple(frames.shape)}")
    time_dim = frames.dim() - 4
    median = frames.median(dim=time_dim, keepdim=True).values
    deviation = (frames - median).abs().amax(dim=-3, keepdim=True)
    return (deviation > threshold).to(frames.dtype)


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------
class BackgroundModule(nn.Module):
    """Uncertainty net + background extractor (figure 4).

    ``forward(image [B,C,H,W], foreground_mask [B,1,H,W] | None = None) -> dict(
    foreground_logits [B,1,H,W], foreground [B,1,H,W] (sigmoid), rgb [B,3,H,W], depth [B,1,H,W],
    depth_code [B, depth_bottleneck], token_keep [B,T])``.

    The extractor is masked by the **detached** predicted foreground (the reconstruction loss must
    not teach the uncertainty net to call everything foreground), or by ``foreground_mask`` when
    given (teacher forcing with the ground-truth mask while pre-training).
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        self.config = config
        self.uncertainty = UncertaintyNet(config)
        self.extractor = BackgroundExtractor(config)

    def forward(self, image: torch.Tensor, foreground_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.uncertainty(image)
        foreground = torch.sigmoid(logits)
        mask = foreground.detach() if foreground_mask is None else foreground_mask.to(image.dtype)
        out = self.extractor(image, mask)
        return {"foreground_logits": logits, "foreground": foreground, **out}

    uncertainty_loss = staticmethod(uncertainty_loss)
    background_reconstruction_loss = staticmethod(background_reconstruction_loss)
