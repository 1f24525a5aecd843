"""The training stages of the paper, each an ``nn.Module`` whose ``forward(batch)`` returns the loss.

Wrapping a stage's computation in a module (instead of calling ``LociS`` submodules from the loop)
lets :class:`torch.nn.parallel.DistributedDataParallel` wrap it: only the stage's trainable
submodules require gradients, so DDP synchronises exactly those.

Phases (``--stage all`` runs them in this order):

==========================  ==========================  ======================================
phase                       trains                      loss
==========================  ==========================  ======================================
``background/uncertainty``  ``background.uncertainty``  BCE vs. foreground target (3.4)
``background/extractor``    ``background.extractor``    background-only reconstruction (3.4)
``objects``                 ``encoder`` + ``decoder``   single-object mask BCE + rgb/depth (3.5)
``objects/context``         ``encoder`` + ``decoder``   per-slot visible-mask BCE + rgb/depth
                            (optional, not in the       over warm-up passes with the decoded
                            paper)                      slot context (:class:`ContextStage`)
``proposal``                ``proposals``               :func:`proposal_loss` (3.6)
``full``                    all but ``background``,     ``LociS.loss`` over truncated-BPTT
                            ``proposals``               windows + percept-gate L0 (4)
``full/long``               as ``full`` (optional: a    as ``full``, with a fresh optimiser
                            second, longer phase)       and schedule (``stages.full.long_*``)
==========================  ==========================  ======================================
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from locis_rl.model.blocks import gaussian_heatmap
from locis_rl.model.depth_input import scene_relative_depth
from locis_rl.model.slot_assignment import positions_from_masks
from locis_rl.pretrain.config import TrainConfig
from locis_rl.pretrain.data import Batch

__all__ = ["PHASES", "phases_for", "StageModule", "build_stage", "scene_image", "target_depth",
           "single_object_inputs", "pick_slot_objects"]

PHASES = ("background/uncertainty", "background/extractor", "objects", "objects/context", "proposal", "full",
          "full/long")


def phases_for(stage: str, cfg: TrainConfig | None = None) -> list[str]:
    """Phases of a ``--stage`` value (``all`` = every phase in order).

    With ``cfg``, the optional phases it gives no steps (``objects/context`` without
    ``stages.objects.context_steps``, ``full/long`` without ``stages.full.long_steps``) are left
    out, so runs without them keep their phase list. Without ``cfg`` both are left out.
    """
    if stage == "all":
        out = list(PHASES)
    else:
        out = [p for p in PHASES if p.split("/")[0] == stage]
    if not out:
        raise ValueError(f"unknown stage {stage!r}; expected background, objects, proposal, full or all")
    if cfg is None or cfg.stages.objects.context_steps <= 0:
        out = [p for p in out if p != "objects/context"]
    if cfg is None or cfg.stages.full.long_steps <= 0:
        out = [p for p in out if p != "full/long"]
    return out


def phase_steps(cfg: TrainConfig, phase: str) -> int:
    s = cfg.stages
    return {
        "background/uncertainty": s.background.uncertainty_steps,
        "background/extractor": s.background.extractor_steps,
        "objects": s.objects.steps,
        "objects/context": s.objects.context_steps,
        "proposal": s.proposal.steps,
        "full": s.full.steps,
        "full/long": s.full.long_steps,
    }[phase]


def phase_schedule_steps(cfg: TrainConfig, phase: str) -> int:
    """Length of a phase's learning-rate schedule: its steps, except ``full/long`` with
    ``stages.full.long_schedule_steps`` set."""
    if phase == "full/long" and cfg.stages.full.long_schedule_steps > 0:
        return cfg.stages.full.long_schedule_steps
    return phase_steps(cfg, phase)


def phase_max_seconds(cfg: TrainConfig, phase: str) -> float:
    """Wall-clock budget of a phase in seconds (0: none), from its stage's ``max_minutes``."""
    if phase == "objects/context":
        return 60.0 * cfg.stages.objects.context_max_minutes
    if phase == "full/long":
        return 60.0 * cfg.stages.full.long_max_minutes
    return 60.0 * getattr(cfg.stages, phase.split("/")[0]).max_minutes


def phase_lr_scale(cfg: TrainConfig, phase: str) -> float:
    return getattr(cfg.stages, phase.split("/")[0]).lr_scale


def phase_batch_size(cfg: TrainConfig, phase: str) -> int:
    s = cfg.stages
    return {
        "background/uncertainty": s.background.batch_size,
        "background/extractor": s.background.batch_size,
        "objects": s.objects.batch_size,
        "objects/context": s.objects.context_batch_size,
        "proposal": s.proposal.batch_size,
        "full": s.full.batch_size,
        "full/long": s.full.batch_size,
    }[phase]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def target_depth(depth: torch.Tensor | None) -> torch.Tensor | None:
    """Scene-relative depth ``[N,1,H,W]`` in [0, 1] (appendix B) from raw metric depth, or None."""
    if depth is None:
        return None
    return scene_relative_depth(depth)


def scene_image(rgb: torch.Tensor, depth: torch.Tensor | None, use_depth: bool) -> torch.Tensor:
    """Scene input ``[N, C, H, W]``: RGB, plus scene-relative depth for Loci-s_d."""
    if not use_depth:
        return rgb
    if depth is None:
        raise ValueError("model.use_depth=true needs depth in the data (files recorded with depth)")
    return torch.cat([rgb, scene_relative_depth(depth)], dim=1)


def single_object_inputs(rgb: torch.Tensor, depth: torch.Tensor | None, gaussian: torch.Tensor,
                         in_channels: int, use_depth: bool, *, model: nn.Module | None = None,
                         position: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder input for single-object pretraining (section 3.5).

    Channel layout of ``LociSConfig.encoder_in_channels``: frame (3) | previous error (1) |
    background mask (1) | position Gaussian (1) | visible mask (1) | object mask (1) | slot RGB
    (3) | other slots' masks (1) [| scene depth (1) | slot depth (1)]. Everything slot-specific
    or depending on other slots is nullified except the Gaussian.

    With ``model`` and ``position [N,4]``, the model's own input builder (``LociS._encoder_inputs``)
    assembles the stack with one slot per row and zero slot inputs, so the layout always matches
    what ``LociS.step`` feeds the encoder.
    """
    n, _, h, w = rgb.shape
    builder = getattr(model, "_encoder_inputs", None) if model is not None else None
    if builder is not None and position is not None:
        z1 = rgb.new_zeros(n, 1, h, w)
        scene_depth = scene_relative_depth(depth) if (use_depth and depth is not None) else None
        return builder(rgb, z1, z1, scene_depth, position[:, None], rgb.new_zeros(n, 2, h, w),
                       rgb.new_zeros(n, 1, h, w), rgb.new_zeros(n, 1, 3, h, w), rgb.new_zeros(n, 1, 1, h, w))
    x = rgb.new_zeros(n, in_channels, h, w)
    x[:, 0:3] = rgb
    x[:, 5] = gaussian
    if use_depth and depth is not None:
        x[:, 12:13] = scene_relative_depth(depth)
    return x


def _jitter_mask(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A decoded-looking version of binary masks ``[N,1,H,W]``: each row dilated, eroded or kept
    (one pixel, equal odds), then softened by a 3x3 box filter like a decoder's soft edges."""
    n = mask.shape[0]
    dilated = F.max_pool2d(mask, 3, stride=1, padding=1)
    eroded = 1.0 - F.max_pool2d(1.0 - mask, 3, stride=1, padding=1)
    pick = torch.randint(0, 3, (n,), generator=generator).to(mask.device).view(n, 1, 1, 1)
    shaped = torch.where(pick == 0, dilated, torch.where(pick == 1, eroded, mask))
    shaped = torch.where(shaped.sum(dim=(1, 2, 3), keepdim=True) > 0, shaped, mask)  # erosion can empty it
    return F.avg_pool2d(shaped, 3, stride=1, padding=1, count_include_pad=False)


def _first_frame(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[:, 0]


# --------------------------------------------------------------------------------------------
# stage modules
# --------------------------------------------------------------------------------------------
class StageModule(nn.Module):
    """Base: holds the model, names the trained submodules, computes ``(loss, logs)``."""

    phase = ""
    frames_per_row = 1

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def trained_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze_others(self) -> list[nn.Parameter]:
        """Only the trained submodules require gradients; returns their parameters."""
        self.model.requires_grad_(False)
        params: list[nn.Parameter] = []
        for m in self.trained_modules():
            m.requires_grad_(True)
            params += [p for p in m.parameters() if p.requires_grad]
        # de-duplicate shared parameters, keep order
        seen, unique = set(), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        self.freeze_params = unique
        return unique

    def forward(self, *args: Any, **kwargs: Any):
        """``compute`` plus ``0 *`` one element of every trained parameter.

        Every trained parameter then takes part in every backward pass (e.g. the transition's
        output layer in the last window of a sequence, which has no next frame to predict), so
        DDP runs with a static set of used parameters (``find_unused_parameters=False``) and each
        gradient hook fires exactly once per pass.
        """
        res = self.compute(*args, **kwargs)
        params = getattr(self, "freeze_params", None) or []
        if params:
            touch = torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0
            res = (res[0] + touch.to(res[0].dtype),) + tuple(res[1:])
        return res

    def sample(self, store, items, generator: torch.Generator) -> Batch:
        """One random frame per episode (image stages)."""
        t = torch.randint(0, store.frames, (len(items),), generator=generator)
        return store.batch(items, t, 1)


class UncertaintyStage(StageModule):
    phase = "background/uncertainty"

    def trained_modules(self):
        return [self.model.background.uncertainty]

    def compute(self, batch: Batch, **_: Any):
        from locis_rl.model.background import uncertainty_loss

        image = scene_image(batch.rgb[:, 0], _first_frame(batch.depth), self.model.config.use_depth)
        fg = batch.foreground[:, 0]
        logits = self.model.background.uncertainty(image)
        pos_weight = self.cfg.stages.background.foreground_pos_weight
        if pos_weight <= 0:  # automatic: background / foreground pixel ratio of the batch
            n_fg = fg.sum()
            pos_weight = float(((fg.numel() - n_fg) / n_fg.clamp_min(1.0)).clamp(1.0, 100.0))
        loss = uncertainty_loss(logits.float(), fg, pos_weight=pos_weight)
        with torch.no_grad():
            pred = logits.float() > 0
            target = fg > 0.5
            iou = ((pred & target).sum() / (pred | target).sum().clamp_min(1)).float()
        return loss, {"loss/uncertainty_bce": loss.detach(), "charts/foreground_iou": iou}


class ExtractorStage(StageModule):
    phase = "background/extractor"

    def trained_modules(self):
        return [self.model.background.extractor]

    def compute(self, batch: Batch, **_: Any):
        from locis_rl.model.background import background_reconstruction_loss

        depth = _first_frame(batch.depth)
        rgb = batch.rgb[:, 0]
        image = scene_image(rgb, depth, self.model.config.use_depth)
        fg_target = batch.foreground[:, 0]
        if self.cfg.stages.background.teacher_forcing:
            mask = fg_target
        else:
            with torch.no_grad():
                mask = torch.sigmoid(self.model.background.uncertainty(image)).float()
        out = self.model.background.extractor(image, mask.to(image.dtype))
        loss = background_reconstruction_loss(out["rgb"].float(), out["depth"].float(), rgb,
                                              target_depth(depth), fg_target)
        return loss, {"loss/background_reconstruction": loss.detach()}


class ObjectsStage(StageModule):
    """Single-object encoder/decoder pretraining (section 3.5)."""

    phase = "objects"

    def trained_modules(self):
        return [self.model.encoder, self.model.decoder]

    def compute(self, batch: Batch, generator: torch.Generator | None = None, **_: Any):
        c = self.cfg.stages.objects
        rgb = batch.rgb[:, 0]
        depth = _first_frame(batch.depth)
        inst = batch.instances[:, 0]
        n, _, h, w = rgb.shape
        target, valid = pick_objects(inst, c.min_pixels, generator)
        position = perturbed_positions(target, valid, c.position_noise, c.size_noise, generator)
        gaussian = gaussian_heatmap(position, h, w)
        cfg = self.model.config
        inputs = single_object_inputs(rgb, depth, gaussian, cfg.encoder_in_channels, cfg.use_depth,
                                      model=self.model, position=position)
        prior = rgb.new_zeros(n, cfg.gestalt_dim)
        pos, gestalt = self.model.encoder(inputs, prior)
        weight = valid.to(rgb.dtype)
        m = target.unsqueeze(1).to(rgb.dtype)
        denom_rows = weight.sum().clamp_min(1.0)
        true_pos = positions_from_masks(m, valid.unsqueeze(1)).squeeze(1)  # [N,4] centroid, std
        decode_pos = torch.cat([true_pos[:, :3], pos[:, 3:]], dim=1) if c.teacher_position else pos
        dec = self.model.decoder(decode_pos, gestalt)
        bce = F.binary_cross_entropy_with_logits(dec["mask_logits"].float(), m, reduction="none")
        if c.balanced_mask_loss:  # objects cover a few % of the image: weigh object and rest equally
            fg_bce = (bce * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1.0)
            bg_bce = (bce * (1 - m)).sum(dim=(1, 2, 3)) / (1 - m).sum(dim=(1, 2, 3)).clamp_min(1.0)
            per_row = 0.5 * (fg_bce + bg_bce)
        else:
            per_row = bce.mean(dim=(1, 2, 3))
        mask_loss = (per_row * weight).sum() / denom_rows
        area = m.sum(dim=(1, 2, 3)).clamp_min(1.0)
        rgb_err = ((dec["rgb"].float() - rgb).pow(2).mean(1, keepdim=True) * m).sum(dim=(1, 2, 3)) / area
        rgb_loss = (rgb_err * weight).sum() / denom_rows
        loss = c.mask_weight * mask_loss + c.rgb_weight * rgb_loss
        logs = {"loss/objects_mask_bce": mask_loss.detach(), "loss/objects_rgb": rgb_loss.detach()}
        if c.position_weight > 0:
            pos_err = (pos[:, :3].float() - true_pos[:, :3]).pow(2).sum(dim=1)
            position_loss = (pos_err * weight).sum() / denom_rows
            loss = loss + c.position_weight * position_loss
            logs["loss/objects_position"] = position_loss.detach()
        tdepth = target_depth(depth)
        if tdepth is not None:
            d_err = ((dec["depth"].float() - tdepth).pow(2) * m).sum(dim=(1, 2, 3)) / area
            depth_loss = (d_err * weight).sum() / denom_rows
            loss = loss + c.depth_weight * depth_loss
            logs["loss/objects_depth"] = depth_loss.detach()
        with torch.no_grad():
            pm = dec["mask_logits"].float() > 0
            tm = m > 0.5
            iou = (pm & tm).sum(dim=(1, 2, 3)) / (pm | tm).sum(dim=(1, 2, 3)).clamp_min(1)
            logs["charts/objects_mask_iou"] = (iou * weight).sum() / denom_rows
            logs["charts/objects_position_error"] = (((pos[:, :2] - position[:, :2]).norm(dim=1) * weight).sum()
                                                     / denom_rows)
        if weight.sum() == 0:  # no object in the whole batch: keep the graph, contribute nothing
            loss = loss * 0.0
        return loss, logs


def _usable_instances(instances: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """``[N, max_id + 1]`` bool: which instance ids of each image ``[N,H,W]`` have at least
    ``min_pixels`` pixels (id 0, the background, never)."""
    n = instances.shape[0]
    flat = instances.reshape(n, -1).long().clamp_min(0)
    num = int(flat.max().item()) + 1 if flat.numel() else 1
    counts = torch.zeros(n, num, dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    ok = counts >= max(1, min_pixels)
    ok[:, 0] = False  # background
    return ok


def pick_objects(instances: torch.Tensor, min_pixels: int, generator: torch.Generator | None):
    """One random instance per image: ``(mask [N,H,W] bool, valid [N] bool)``."""
    n = instances.shape[0]
    ok = _usable_instances(instances, min_pixels)
    valid = ok.any(1)
    probs = ok.float() + (~valid).float().unsqueeze(1) * 1e-6  # rows without objects pick anything
    u = torch.rand(probs.shape, generator=generator, device="cpu").to(probs.device)
    choice = torch.argmax(torch.where(probs > 0, u, torch.full_like(u, -1.0)), dim=1)
    mask = instances == choice.view(n, 1, 1).to(instances.dtype)
    return mask & valid.view(n, 1, 1), valid


def perturbed_positions(mask: torch.Tensor, valid: torch.Tensor, noise: float, size_noise: float,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Position codes ``[N, 4]`` from masks, perturbed but kept inside the mask (section 3.5).

    The centroid moves by ``noise * size * N(0, 1)`` per axis; if the moved point falls outside the
    mask, a pixel of the mask is drawn uniformly instead. ``size`` gets a log-normal factor.
    """

    n, h, w = mask.shape
    dev = mask.device
    fmask = mask.float()
    base = positions_from_masks(fmask.unsqueeze(1), valid.unsqueeze(1)).squeeze(1)  # [N,4]
    eps = torch.randn(n, 3, generator=generator).to(dev)
    xy = base[:, :2] + noise * base[:, 2:3] * eps[:, :2]
    col = ((xy[:, 0] + 1) * 0.5 * (w - 1)).round().long().clamp(0, w - 1)
    row = ((xy[:, 1] + 1) * 0.5 * (h - 1)).round().long().clamp(0, h - 1)
    inside = mask[torch.arange(n, device=dev), row, col]
    # uniform pixel of the mask (Gumbel-max over mask pixels)
    u = torch.rand(n, h * w, generator=generator).to(dev)
    scores = torch.where(mask.reshape(n, -1), u, torch.full_like(u, -1.0))
    idx = scores.argmax(1)
    r2, c2 = idx // w, idx % w
    fallback = torch.stack([-1 + 2 * c2.float() / max(1, w - 1), -1 + 2 * r2.float() / max(1, h - 1)], dim=1)
    xy = torch.where(inside.unsqueeze(1), xy, fallback.to(xy.dtype))
    size = base[:, 2] * torch.exp(size_noise * eps[:, 2])
    size = torch.where(valid, size, torch.full_like(size, 0.1))
    position = torch.stack([xy[:, 0], xy[:, 1], size, torch.zeros_like(size)], dim=1)
    return position


def pick_slot_objects(instances: torch.Tensor, num_slots: int, min_pixels: int,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_slots`` random instances per image, one per slot.

    Args: instances ``[N,H,W]`` int ids (0 = background).

    Returns: ``(masks [N,K,H,W] bool, valid [N,K] bool)``; slots beyond an image's objects are
    invalid with empty masks.
    """
    n = instances.shape[0]
    ok = _usable_instances(instances, min_pixels)
    num = ok.shape[1]
    u = torch.rand(ok.shape, generator=generator).to(ok.device)
    score = torch.where(ok, u, torch.full_like(u, -1.0))
    k = min(num_slots, num)
    top, ids = score.topk(k, dim=1)
    valid = top >= 0
    if k < num_slots:  # fewer ids in the whole batch than slots
        pad = num_slots - k
        ids = torch.cat([ids, ids.new_zeros(n, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(n, pad)], dim=1)
    masks = (instances[:, None] == ids[:, :, None, None].to(instances.dtype)) & valid[:, :, None, None]
    return masks, valid


def _balanced_bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of the object-pixel and the other-pixel BCE of probabilities ``[..., H, W]``: ``[...]``."""
    bce = F.binary_cross_entropy(prob.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    fg = (bce * target).sum(dim=(-2, -1)) / target.sum(dim=(-2, -1)).clamp_min(1.0)
    bg = (bce * (1 - target)).sum(dim=(-2, -1)) / (1 - target).sum(dim=(-2, -1)).clamp_min(1.0)
    return 0.5 * (fg + bg)


class ContextStage(StageModule):
    """Multi-object warm-up training with the decoded slot context (``objects/context``).

    Mirrors :meth:`LociS.warmup` on first frames with ground-truth slot assignment: up to
    ``num_slots`` objects of an image each get a slot at a perturbed position (section 3.5's
    perturbation); pass 1 encodes with empty slot context; every later pass encodes with the
    visible / object masks, RGB and depth the previous pass decoded and composed (detached, as
    between frames of truncated BPTT), the previous Gestalt code as prior. For half the images
    the object-mask channel carries the jittered ground-truth mask instead, as ``seg`` mode puts
    the proposal masks there. The background comes from the trained (frozen) background module.

    Loss per pass (averaged): balanced BCE of each slot's composed *visible* mask against its
    object's ground-truth mask, RGB (and depth) error inside it, the composite reconstruction,
    and (``position_weight``) the encoder's position error.
    """

    phase = "objects/context"

    def trained_modules(self):
        return [self.model.encoder, self.model.decoder]

    def compute(self, batch: Batch, generator: torch.Generator | None = None, **_: Any):
        c = self.cfg.stages.objects
        model = self.model
        cfg = model.config
        rgb = batch.rgb[:, 0]
        depth = _first_frame(batch.depth)
        n, _, h, w = rgb.shape
        k, g = cfg.num_slots, cfg.gestalt_dim
        masks, valid = pick_slot_objects(batch.instances[:, 0], k, c.min_pixels, generator)
        target = masks.to(rgb.dtype)  # [N,K,H,W]
        position = perturbed_positions(masks.reshape(n * k, h, w), valid.reshape(-1), c.position_noise,
                                       c.size_noise, generator).view(n, k, 4)
        true_pos = positions_from_masks(target, valid)
        presence = valid.to(rgb.dtype)
        scene_depth = scene_relative_depth(depth) if cfg.use_depth else None
        tdepth = scene_depth if scene_depth is not None else target_depth(depth)
        image = torch.cat([rgb, scene_depth], dim=1) if scene_depth is not None else rgb
        with torch.no_grad():
            bg = model.background(image)
        background_mask = 1.0 - bg["foreground"]
        proposal_rows = (torch.rand(n, generator=generator) < 0.5).to(rgb.device).view(n, 1, 1, 1)
        proposal = _jitter_mask(target.reshape(n * k, 1, h, w), generator).view(n, k, h, w) * presence[..., None, None]
        objects = torch.where(proposal_rows, proposal, torch.zeros_like(proposal))
        visible = torch.cat([rgb.new_zeros(n, k, h, w), rgb.new_ones(n, 1, h, w)], dim=1)
        slot_rgb = rgb.new_zeros(n, k, 3, h, w)
        slot_depth = rgb.new_zeros(n, k, 1, h, w)
        gestalt = rgb.new_zeros(n, k, g)
        error = rgb.new_zeros(n, 1, h, w)
        weight = presence
        denom = weight.sum().clamp_min(1.0)
        area = target.sum(dim=(-2, -1)).clamp_min(1.0)
        total = rgb.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        passes = c.context_passes
        for it in range(passes):
            inputs = model._encoder_inputs(rgb, error, background_mask, scene_depth, position, visible,
                                           objects, slot_rgb, slot_depth)
            pos_flat, gestalt_flat = model.encoder(inputs, gestalt.reshape(n * k, g))
            pos, code = pos_flat.view(n, k, 4), gestalt_flat.view(n, k, g)
            dec = model._decode(pos, code, presence, bg["rgb"], bg["depth"])
            vis = dec["masks"][:, :k].float()
            mask_loss = (_balanced_bce(vis, target) * weight).sum() / denom
            rgb_err = ((dec["slot_rgb"].float() - rgb[:, None]).pow(2).mean(2) * target).sum(dim=(-2, -1)) / area
            rgb_loss = (rgb_err * weight).sum() / denom
            recon = F.mse_loss(dec["rgb"].float(), rgb)
            loss = c.mask_weight * mask_loss + c.rgb_weight * (rgb_loss + recon)
            if tdepth is not None:
                d_err = ((dec["slot_depth"][:, :, 0].float() - tdepth).pow(2) * target).sum(dim=(-2, -1)) / area
                loss = loss + c.depth_weight * (d_err * weight).sum() / denom
            if c.position_weight > 0:
                pos_err = (pos[..., :3].float() - true_pos[..., :3]).pow(2).sum(-1)
                loss = loss + c.position_weight * (pos_err * weight).sum() / denom
            total = total + loss / passes
            with torch.no_grad():
                pm, tm = vis > 0.5, target > 0.5
                iou = (pm & tm).sum(dim=(-2, -1)) / (pm | tm).sum(dim=(-2, -1)).clamp_min(1)
                logs[f"charts/context_mask_iou_pass{it + 1}"] = (iou * weight).sum() / denom
            # the next pass sees what this one decoded, as in LociS.warmup (no gradient across)
            position, gestalt = pos.detach(), code.detach()
            visible, slot_rgb, slot_depth = dec["masks"].detach(), dec["slot_rgb"].detach(), dec["slot_depth"].detach()
            objects = torch.where(proposal_rows, proposal, dec["object_masks"].detach())
        logs["loss/context_mask_bce"] = mask_loss.detach()
        logs["loss/context_recon"] = recon.detach()
        if weight.sum() == 0:
            total = total * 0.0
        return total, logs


class ProposalStage(StageModule):
    phase = "proposal"

    def trained_modules(self):
        return [self.model.proposals]

    def compute(self, batch: Batch, **_: Any):
        from locis_rl.model.proposals import proposal_loss

        if batch.segmentation is None:
            raise ValueError("the proposal stage needs segmentation masks in the data")
        image = scene_image(batch.rgb[:, 0], _first_frame(batch.depth), self.model.config.use_depth)
        out = self.model.proposals(image)
        out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}
        res = proposal_loss(out, batch.segmentation[:, 0])
        if isinstance(res, dict):
            loss = res["loss"]
            logs = {f"loss/proposal_{k}": v.detach() for k, v in res.items()}
        else:
            loss = res
            logs = {"loss/proposal": loss.detach()}
        return loss, logs


class FullStage(StageModule):
    """Full Loci-s video training (section 4).

    ``forward(batch_window, state)`` runs ``LociS.step`` over one truncated-BPTT window and returns
    the summed ``LociS.loss`` (which includes the percept-gate and GateL0RD L0 terms); the caller
    backpropagates and detaches the state (``LociS.detach_state``) before the next window.
    """

    phase = "full"

    def trained_modules(self):
        m = self.model
        return [getattr(m, name) for name in ("encoder", "decoder", "percept_gate", "transition")
                if hasattr(m, name)]

    def sample(self, store, items, generator: torch.Generator) -> Batch:
        length = min(self.cfg.stages.full.seq_len, store.frames)
        start = torch.randint(0, store.frames - length + 1, (len(items),), generator=generator)
        first = self.cfg.stages.full.first_frame_fraction
        if first > 0:  # drawn only when asked for: runs without it keep their random stream
            start = torch.where(torch.rand(len(items), generator=generator) < first, 0, start)
        return store.batch(items, start, length)

    mode: str | None = None
    """Slot-assignment mode in training (None = ``model.config.assignment.mode``)."""

    def compute(self, batch: Batch, state=None, t0: int = 0, t1: int | None = None, **_: Any):
        return full_window(self.model, batch, state, t0, batch.rgb.shape[1] if t1 is None else t1, self.mode)


def full_window(model, batch: Batch, state, t0: int, t1: int, mode: str | None = None):
    """``LociS.step`` over frames ``t0 .. t1-1`` of ``batch`` (one truncated-BPTT window).

    Loss per frame: ``LociS.loss`` (reconstruction of the frame, prediction of the next frame
    when the sequence has one, weighted gate + GateL0RD L0 terms), averaged over the window.
    Returns ``(loss, logs, state)``; the state is *not* detached (the caller does it).
    """
    if state is None:
        state = model.init_state(batch.rgb.shape[0], batch.rgb.device)
    T = batch.rgb.shape[1]
    losses = []
    logs: dict[str, torch.Tensor] = {}
    n = t1 - t0
    for t in range(t0, t1):
        rgb = batch.rgb[:, t]
        depth = None if batch.depth is None else batch.depth[:, t]
        use_depth = model.config.use_depth
        out, state = model.step(rgb, depth if use_depth else None, state, mode=mode)
        nxt = t + 1 < T
        res = model.loss(out, rgb, depth, batch.rgb[:, t + 1] if nxt else None,
                         batch.depth[:, t + 1] if (nxt and batch.depth is not None) else None)
        loss = res["total"] if isinstance(res, dict) else res
        if isinstance(res, dict):
            for k, v in res.items():
                if k != "total" and torch.is_tensor(v) and v.dim() == 0:
                    logs[f"loss/full_{k}"] = logs.get(f"loss/full_{k}", 0.0) + v.detach().float() / n
        losses.append(loss.float())
        with torch.no_grad():
            gate = out["gate"].float()
            logs["charts/gate_open"] = logs.get("charts/gate_open", 0.0) + (gate > 0).float().mean() / n
            logs["charts/slots_present"] = (logs.get("charts/slots_present", 0.0)
                                            + (out["presence"].float() > 0.5).sum(1).float().mean() / n)
    total = torch.stack(losses).mean()
    logs["loss/full_total"] = total.detach()
    return total, logs, state


def build_stage(phase: str, model: nn.Module, cfg: TrainConfig) -> StageModule:
    cls = {
        "background/uncertainty": UncertaintyStage,
        "background/extractor": ExtractorStage,
        "objects": ObjectsStage,
        "objects/context": ContextStage,
        "proposal": ProposalStage,
        "full": FullStage,
        "full/long": FullStage,
    }[phase]
    return cls(model, cfg)
