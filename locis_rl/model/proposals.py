"""YOLACT-like proposal (segmentation pre-processing) network, section 3.6 and table 7.

:class:`ProposalNet` predicts ``num_prototypes`` full-resolution prototype maps with a U-Net and,
from a hypernetwork on the globally pooled deepest features, per-instance coefficients over those
prototypes plus a score per instance ("ApplyHyperWeights": ``instance_logits = coefficients @
prototypes``). One extra coefficient row gives a background logit map, so the per-pixel softmax runs
over ``Q`` instances + background (background last, as in the decoder's composition).

:func:`proposal_loss` trains it as in the paper: per row, the predicted instance masks are matched to
the ground-truth objects once by a linear sum assignment on IoU; then a per-pixel cross-entropy over
``[Q instances, background]`` against the matched targets, and a BCE on the scores (matched = 1).

Every row is independent (LayerNorm only, no BatchNorm); nothing is stochastic.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .blocks import ConvNeXtBlock, PatchConvTranspose2d, ResidualPatchEmbedding, coordinate_grid
from .config import LociSConfig

__all__ = ["ProposalNet", "proposal_loss", "relabel_segmentation"]

STAGE_STRIDES = (4, 2, 2, 2)
"""Strides of the four residual patch embeddings of table 7 (no config field)."""
UPSAMPLE_EXPANSION = 4
"""Width factor of the 1x1 conv before each up-sampling transposed conv (table 7: 512 -> 2048)."""
FINAL_UPSAMPLE_EXPANSION = 8
"""Width factor before the last (stride 4) up-sampling to the prototypes (table 7: 64 -> 512)."""
SCORE_WEIGHT = 1.0
"""Weight of the score BCE relative to the per-pixel cross-entropy in :func:`proposal_loss`."""
IGNORE = -100


class _Upsample(nn.Sequential):
    """1x1 ``in -> expansion*in`` -> SiLU -> ConvTranspose(k = stride) ``-> out``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__(nn.Conv2d(in_channels, expansion * in_channels, 1), nn.SiLU(),
                         PatchConvTranspose2d(expansion * in_channels, out_channels, stride))


class ProposalNet(nn.Module):
    """Prototype U-Net + hypernetwork instance coefficients (table 7, scaled by ``config.proposals``).

    Encoder: image ``[B,C,H,W]`` concatenated with the ``(x, y)`` grid in ``[-1,1]``, four residual
    patch embeddings (strides 4, 2, 2, 2; channels ``b, 2b, 4b, 8b`` with ``b = base_channels``),
    each followed by ``stage_blocks[i]`` ConvNeXt blocks.
    Hypernetwork: global average pool of the deepest features -> 3-layer SiLU MLP (``hyper_hidden``)
    -> ``(Q + 1) x num_prototypes`` coefficients (last row = background) and ``Q`` score logits.
    Decoder: ConvNeXt at the deepest level, then per level up-sampling (1x1 expand, SiLU, transposed
    conv), concatenation with the encoder skip, 1x1 fuse and a ConvNeXt block; the last up-sampling
    (stride 4) produces ``num_prototypes`` maps at full resolution.

    ``forward(image [B,C,H,W]) -> dict(
        instance_logits [B,Q,H,W], background_logits [B,1,H,W],
        scores [B,Q] (sigmoid, in [0,1]), score_logits [B,Q],
        prototypes [B,P,H,W], coefficients [B,Q+1,P])`` with ``C = config.image_channels``,
    ``Q = proposals.max_instances``, ``P = proposals.num_prototypes``; ``H, W`` divisible by 32.
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        pc = config.proposals
        if len(pc.stage_blocks) != len(STAGE_STRIDES):
            raise ValueError(f"proposals.stage_blocks must have {len(STAGE_STRIDES)} entries, "
                             f"actual value: {pc.stage_blocks}")
        self.config = config
        self.max_instances = pc.max_instances
        self.num_prototypes = pc.num_prototypes
        channels = [pc.base_channels * 2 ** i for i in range(len(STAGE_STRIDES))]
        self.encoder = nn.ModuleList()
        in_ch = config.image_channels + 2
        for ch, stride, blocks in zip(channels, STAGE_STRIDES, pc.stage_blocks):
            self.encoder.append(nn.Sequential(ResidualPatchEmbedding(in_ch, ch, stride),
                                              *[ConvNeXtBlock(ch) for _ in range(blocks)]))
            in_ch = ch

        q, p, hidden = pc.max_instances, pc.num_prototypes, pc.hyper_hidden
        self.hyper = nn.Sequential(nn.Linear(channels[-1], hidden), nn.SiLU(),
                                   nn.Linear(hidden, hidden), nn.SiLU(),
                                   nn.Linear(hidden, (q + 1) * p + q))

        self.bottom = ConvNeXtBlock(channels[-1])
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in range(len(channels) - 1, 0, -1):
            self.up.append(_Upsample(channels[level], channels[level - 1], STAGE_STRIDES[level], UPSAMPLE_EXPANSION))
            self.fuse.append(nn.Conv2d(2 * channels[level - 1], channels[level - 1], 1))
            self.up_blocks.append(ConvNeXtBlock(channels[level - 1]))
        self.to_prototypes = _Upsample(channels[0], p, STAGE_STRIDES[0], FINAL_UPSAMPLE_EXPANSION)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = image.shape
        grid = coordinate_grid(h, w, device=image.device, dtype=image.dtype).expand(b, -1, -1, -1)
        x = torch.cat([image, grid], dim=1)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        skips.pop()

        q, p = self.max_instances, self.num_prototypes
        hyper = self.hyper(x.mean(dim=(2, 3)))
        coefficients = hyper[:, : (q + 1) * p].view(b, q + 1, p)
        score_logits = hyper[:, (q + 1) * p:]

        x = self.bottom(x)
        for up, fuse, block in zip(self.up, self.fuse, self.up_blocks):
            x = block(fuse(torch.cat([up(x), skips.pop()], dim=1)))
        prototypes = self.to_prototypes(x)

        logits = torch.einsum("bkp,bphw->bkhw", coefficients, prototypes)  # ApplyHyperWeights
        return {
            "instance_logits": logits[:, :q],
            "background_logits": logits[:, q:],
            "scores": torch.sigmoid(score_logits),
            "score_logits": score_logits,
            "prototypes": prototypes,
            "coefficients": coefficients,
        }

    @torch.no_grad()
    def predict_instances(self, image: torch.Tensor, score_threshold: float | None = None,
                          min_pixels: int | None = None) -> dict[str, torch.Tensor]:
        """Hard instance masks, fully vectorised (no connected components, no loops).

        Instances whose score is below ``score_threshold`` are removed from the competition; every
        pixel then goes to the arg-max of the remaining instances and the background; an instance
        with fewer than ``min_pixels`` pixels is invalid and its mask zeroed.
        Defaults: ``proposals.score_threshold`` and ``proposals.min_instance_pixels``.

        Returns:
            ``dict(masks [B,Q,H,W] float {0,1} (disjoint), valid [B,Q] bool, scores [B,Q])``.
        """
        pc = self.config.proposals
        threshold = pc.score_threshold if score_threshold is None else score_threshold
        min_pixels = pc.min_instance_pixels if min_pixels is None else min_pixels
        out = self.forward(image)
        scored = out["scores"] > threshold
        logits = out["instance_logits"].masked_fill(~scored[:, :, None, None], float("-inf"))
        winner = torch.cat([logits, out["background_logits"]], dim=1).argmax(dim=1)  # [B,H,W]
        q = self.max_instances
        masks = F.one_hot(winner, q + 1)[..., :q].permute(0, 3, 1, 2)
        valid = scored & (masks.sum(dim=(2, 3)) >= min_pixels)
        masks = (masks * valid[:, :, None, None]).to(image.dtype)
        return {"masks": masks, "valid": valid, "scores": out["scores"]}


def relabel_segmentation(segmentation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary positive object ids of each row to ``1..N_b`` (0 stays background).

    Args:
        segmentation: ``[B,H,W]`` int64, 0 = background.

    Returns:
        ``(labels [B,H,W] int64 in 0..N_max, counts [B] int64 = N_b)``; within a row, ids keep
        their sorted order. Vectorised: one global ``torch.unique`` compresses the ids, a bincount
        over ``(row, id)`` keys marks which are present per row, a cumsum ranks them.
    """
    b = segmentation.shape[0]
    # compress ids to 0..U-1 (order kept; background 0 -> 0 when present, objects -> >= 1)
    ids, compressed = torch.unique(segmentation, return_inverse=True)
    compressed = compressed + (ids[0] != 0).long()
    span = ids.numel() + 1
    rows = torch.arange(b, device=segmentation.device).view(b, 1, 1)
    keys = (rows * span + compressed).flatten()
    present = torch.bincount(keys, minlength=b * span).view(b, span) > 0
    present[:, 0] = False  # background
    rank = torch.cumsum(present.long(), dim=1) * present  # [B, span]: 1..N_b at present object ids
    labels = rank.flatten()[keys].view_as(segmentation)
    return labels, present.sum(dim=1)


def proposal_loss(outputs, scores_or_segmentation: torch.Tensor, segmentation: torch.Tensor | None = None,
                  *, background_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Hungarian-matched instance cross-entropy + score BCE (section 3.6).

    Call as ``proposal_loss(net(image), segmentation)`` (preferred), or in the tensor form
    ``proposal_loss(instance_logits [B,Q,H,W], scores [B,Q] in [0,1], segmentation,
    background_logits=None)`` (background logit 0 when not given).

    Per row: ground-truth ids are relabelled to ``1..N``; the soft IoU (``|A B| / (|A| + |B| -
    |A B|)`` of the softmax probabilities over ``[Q instances, background]`` against the one-hot
    objects) is computed in torch and matched by ``scipy.optimize.linear_sum_assignment`` (the only
    loop over rows). Each matched object's pixels get its instance as cross-entropy target,
    background pixels the background class; unmatched instances get no pixels; when ``N > Q`` the
    pixels of unmatched objects are ignored. Scores: BCE with target 1 for matched instances.

    Returns:
        ``dict(loss, ce, score)`` scalars; ``loss = ce + SCORE_WEIGHT * score``.
    """
    if isinstance(outputs, Mapping):
        if segmentation is not None:
            raise TypeError("proposal_loss(outputs_dict, segmentation) takes two arguments")
        segmentation = scores_or_segmentation
        instance_logits = outputs["instance_logits"]
        background_logits = outputs.get("background_logits", background_logits)
        score_logits = outputs["score_logits"]
    else:
        if segmentation is None:
            raise TypeError("tensor form: proposal_loss(instance_logits, scores, segmentation)")
        instance_logits = outputs
        eps = 1e-6
        score_logits = torch.logit(scores_or_segmentation.clamp(eps, 1 - eps))
    b, q, h, w = instance_logits.shape
    if background_logits is None:
        background_logits = instance_logits.new_zeros(b, 1, h, w)
    logits = torch.cat([instance_logits, background_logits], dim=1)  # [B,Q+1,H,W]

    labels, counts = relabel_segmentation(segmentation.to(torch.long))
    n_max = int(counts.max().item()) if b > 0 else 0
    matched = torch.zeros(b, q, dtype=logits.dtype, device=logits.device)
    # class per ground-truth label (0 = background -> class Q; objects -> matched instance or ignore)
    table = torch.full((b, n_max + 1), IGNORE, dtype=torch.long, device=logits.device)
    table[:, 0] = q
    if n_max > 0:
        with torch.no_grad():
            probs = logits.detach().float().softmax(dim=1)[:, :q].flatten(2)           # [B,Q,HW]
            targets = F.one_hot(labels.flatten(1), n_max + 1)[..., 1:].float()        # [B,HW,N]
            inter = torch.einsum("bqp,bpn->bqn", probs, targets)
            union = probs.sum(-1, keepdim=True) + targets.sum(1).unsqueeze(1) - inter
            iou = (inter / union.clamp_min(1e-6)).cpu().numpy()
        counts_list = counts.tolist()
        rows, instances, objects = [], [], []
        for row in range(b):
            n = counts_list[row]
            if n == 0:
                continue
            r, c = linear_sum_assignment(-iou[row, :, :n])
            rows.append(np.full(len(r), row))
            instances.append(r)
            objects.append(c)
        if rows:
            rows_t = torch.as_tensor(np.concatenate(rows), dtype=torch.long, device=logits.device)
            inst_t = torch.as_tensor(np.concatenate(instances), dtype=torch.long, device=logits.device)
            obj_t = torch.as_tensor(np.concatenate(objects), dtype=torch.long, device=logits.device)
            table[rows_t, obj_t + 1] = inst_t
            matched[rows_t, inst_t] = 1.0
    target = torch.gather(table, 1, labels.flatten(1)).view(b, h, w)
    pixel_ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    keep = (target != IGNORE).to(pixel_ce.dtype)
    ce = (pixel_ce * keep).sum() / keep.sum().clamp_min(1.0)
    score = F.binary_cross_entropy_with_logits(score_logits, matched.to(score_logits.dtype))
    return {"loss": ce + SCORE_WEIGHT * score, "ce": ce, "score": score}
