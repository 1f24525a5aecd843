"""Loci-Segmented (Loci-s): the whole perception step with an explicit, per-row recurrent state.

Paper: "Loci-Segmented: Improving Scene Segmentation Learning" (sections 2-4, appendices A-B).
:class:`LociS` wires the component modules of ``locis_rl.model`` (see ``docs/architecture.md``):

    image -> background module (foreground, background rgb / depth)
          -> [first frame of a row: slot assignment (rnd / reg / seg) + encoder-decoder warm-up]
          -> slot-wise encoder -> percept gate (observed vs predicted codes) -> decoder + composition
          -> transition (next-frame codes) -> decoder + composition (next-frame prediction)
          -> presence update (release empty slots, assign free slots to new objects)

Everything recurrent lives in a :class:`tensordict.TensorDict` with ``batch_size [B]`` that
:meth:`LociS.step` takes and returns; the module keeps no buffers. Rows never interact: per-sample
normalisation in every block, attention within a row only, and sampling from a per-row
counter-based hash (``state["rng_seed"]``), so a row's output does not depend on the other rows
(not even through a shared random stream).

Example:
    >>> model = LociS("tiny").eval()
    >>> state = model.init_state(2, seed=0)
    >>> out, state = model.step(torch.rand(2, 3, 64, 64), state=state)
    >>> out["masks"].shape, state["position"].shape
    (torch.Size([2, 7, 64, 64]), torch.Size([2, 6, 4]))
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from locis_rl.model.background import BackgroundModule
from locis_rl.model.blocks import gaussian_heatmap
from locis_rl.model.checkpoint_io import (CHECKPOINT_FORMAT, FORMAT_VERSION, CheckpointError,
                                          load_model_checkpoint, save_model_checkpoint)
from locis_rl.model.config import (AssignmentConfig, LociSConfig, apply_inference_overrides,
                                   inference_overrides)
from locis_rl.model.decoder import CascadedDecoder
from locis_rl.model.depth_input import scene_relative_depth
from locis_rl.model.encoder import HyperConvNeXtEncoder
from locis_rl.model.percept_gate import PerceptGate
from locis_rl.model.proposals import ProposalNet
from locis_rl.model.slot_assignment import (
    PRESENT_THRESHOLD,
    assign_to_free_slots,
    positions_from_masks,
    regularize_slots,
    sample_free_slot_positions,
    unexplained_foreground,
)
from locis_rl.model.transition import SlotTransition

__all__ = ["LociS", "CheckpointError", "FORMAT_VERSION", "CHECKPOINT_FORMAT", "DEFAULT_CHECKPOINT",
           "DEPTH_CHECKPOINT", "PRETRAINED_NAMES", "pretrained_checkpoint", "MODES", "row_uniform",
           "rows_where", "validate_step_inputs"]

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default.pt"
"""Where ``LociS.from_pretrained("default")`` looks (inside the installed package): RGB input."""
DEPTH_CHECKPOINT = DEFAULT_CHECKPOINT.with_name("depth.pt")
"""Where ``LociS.from_pretrained("depth")`` looks: the same recipe with RGB + depth input."""
PRETRAINED_NAMES = ("default", "depth")
"""Names that ``from_pretrained`` and every ``model=`` / ``--checkpoint`` argument resolve to a
packaged checkpoint instead of a path."""


def pretrained_checkpoint(name: Any) -> Path | None:
    """The packaged file of a pretrained name (:data:`PRETRAINED_NAMES`), or ``None`` for a path.

    ``"default"``: the shipped RGB model (``locis_rl/checkpoints/default.pt``); ``"depth"``: the same
    recipe trained with the depth channel as input (``depth.pt``; needs depth frames).
    """
    if not isinstance(name, (str, os.PathLike)):
        return None
    # looked up at call time, so tests can point the module constants elsewhere
    return {"default": DEFAULT_CHECKPOINT, "depth": DEPTH_CHECKPOINT}.get(str(name))


MODES = ("rnd", "reg", "seg")

PROPOSAL_COVERED_FRACTION = 0.5
"""``seg``: a proposal whose mass lies more than this fraction under present slots is not new."""
# Release rule (step 5): a present slot is released when its decoded unoccluded mask mass falls
# below ``assignment.presence_threshold * assignment.new_object_fraction * H * W`` pixels, i.e.
# (default 0.5) half of the smallest unexplained area that gets a new slot: a hysteresis between
# assigning and releasing. There is no dedicated config field for it (see the integration report).

# Random stream ids (one per place that draws randomness), mixed into the per-row hash.
_STREAM_INITIAL = 1
_STREAM_REGULARIZE = 2
_STREAM_NEW_OBJECT = 3
_STREAM_RESEED = 4

_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Per-row counter-based randomness
# ----------------------------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Integer avalanche hash ("lowbias32") of int64 values taken mod ``2**32``; int64 out."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_key(seed: torch.Tensor, frame: torch.Tensor, stream: int) -> torch.Tensor:
    """32-bit key ``[B]`` from the 64-bit row seed, the row's frame index and a stream id."""
    k = _hash32(torch.full_like(seed, stream * 0x9E3779B9 & _MASK32))
    k = _hash32(k ^ (frame & _MASK32))
    k = _hash32(k ^ ((seed >> 32) & _MASK32))
    return _hash32(k ^ (seed & _MASK32))


def row_uniform(seed: torch.Tensor, frame: torch.Tensor, stream: int, *shape: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in ``(0, 1)`` that depend only on (row seed, row frame index, stream, counter).

    Args:
        seed: ``[B]`` int64 per-row seeds; frame: ``[B]`` int64 per-row frame index.
        stream: a small int naming the purpose (and warm-up iteration) of the draw.
        shape: trailing shape; the counter runs over it.

    Returns:
        ``[B, *shape]`` float. Row ``i`` is the same whatever the other rows are (a counter-based
        generator: no shared stream to advance).
    """
    count = 1
    for s in shape:
        count *= s
    key = _row_key(seed.to(torch.int64), frame.to(torch.int64), stream)
    counter = torch.arange(count, device=seed.device, dtype=torch.int64)
    h = _hash32(key[:, None] ^ _hash32(counter[None] + 0x632BE5AB))
    u = ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)
    return u.to(dtype).view(seed.shape[0], *shape)


def _seeds_from_int(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-row int64 seeds (62 bits, non-negative) derived from one int and the row indices."""
    base = torch.full_like(rows, seed & _MASK32)
    hi = _hash32(_hash32(base ^ ((seed >> 32) & _MASK32)) ^ rows)
    lo = _hash32(hi ^ 0x5BD1E995)
    return ((hi & 0x3FFFFFFF) << 32) | lo


def _sample_positions_rowwise(weights: torch.Tensor, uniform: torch.Tensor, size: float) -> torch.Tensor:
    """Inverse-CDF sampling of pixel positions with given uniforms (row-independent).

    Same coordinate convention as :func:`slot_assignment.sample_free_slot_positions`.

    Args:
        weights: ``[B, H, W]`` non-negative (non-finite / negative count as 0; an all-zero row
            samples uniformly). uniform: ``[B, K]`` in ``(0, 1)``.

    Returns:
        ``[B, K, 4]`` codes ``(x, y, size, priority=0)``.
    """
    b, h, w = weights.shape
    flat = weights.reshape(b, h * w).to(uniform.dtype)
    flat = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat)).clamp_min(0.0)
    empty = flat.sum(dim=1, keepdim=True) <= 0
    flat = torch.where(empty, torch.ones_like(flat), flat)
    cdf = flat.to(torch.float64).cumsum(dim=1)
    target = uniform.to(torch.float64) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).clamp_max(h * w - 1)
    col = (index % w).to(uniform.dtype)
    row = torch.div(index, w, rounding_mode="floor").to(uniform.dtype)
    x = -1.0 + 2.0 * col / max(w - 1, 1)
    y = -1.0 + 2.0 * row / max(h - 1, 1)
    return torch.stack([x, y, torch.full_like(x, float(size)), torch.zeros_like(x)], dim=-1)


def _regularize_rowwise(position: torch.Tensor, gestalt: torch.Tensor, presence: torch.Tensor,
                        cfg: AssignmentConfig, uniform: torch.Tensor) -> torch.Tensor:
    """:func:`slot_assignment.regularize_slots` with pre-drawn per-row coins ``uniform [B, K, K]``.

    Same rule: a present pair ``i < j`` closer than ``reg_distance`` whose Gestalt codes correlate
    above ``reg_correlation`` drops slot ``j`` with probability ``reg_drop_probability``.
    """
    k = position.shape[1]
    present = presence > PRESENT_THRESHOLD
    xy = position[..., :2]
    distance = (xy[:, :, None] - xy[:, None, :]).pow(2).sum(-1).sqrt()
    centred = gestalt - gestalt.mean(dim=-1, keepdim=True)
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    correlation = unit @ unit.transpose(-1, -2)
    upper = torch.ones(k, k, dtype=torch.bool, device=position.device).triu(diagonal=1)
    duplicate = (upper[None] & present[:, :, None] & present[:, None, :]
                 & (distance < cfg.reg_distance) & (correlation > cfg.reg_correlation))
    drop = (duplicate & (uniform < cfg.reg_drop_probability)).any(dim=1)
    return torch.where(drop, torch.zeros_like(presence), presence)


def rows_where(mask: torch.Tensor, a: TensorDict, b: TensorDict) -> TensorDict:
    """Row-wise select: ``a`` where ``mask [B]`` is True, else ``b`` (a new TensorDict)."""
    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x, y)
    return a.apply(pick, b)


def validate_step_inputs(cfg: Any, rgb: Any, depth: Any, state: TensorDict | None, *,
                         check_values: bool = True, state_key: str = "initialized") -> None:
    """Clear errors for bad ``step`` inputs of a slot model (LociS, SAVi).

    Args:
        cfg: the model config (``image_size``, ``use_depth``).
        rgb ``[B,3,S,S]`` float in [0, 1]; depth ``[B,1,S,S]`` or None; state from ``init_state``.
        check_values: also check values (NaN / range), which costs one host sync.
        state_key: a key every state of this model holds (tells a foreign TensorDict apart).
    """
    s = cfg.image_size
    if not isinstance(rgb, torch.Tensor):
        raise TypeError(f"rgb: expected a torch.Tensor [B,3,{s},{s}], actual type: {type(rgb).__name__}")
    if rgb.dtype == torch.uint8:
        raise TypeError("rgb: expected a float tensor in [0, 1], actual dtype: torch.uint8; "
                        "convert with rgb.float() / 255")
    if not rgb.is_floating_point():
        raise TypeError(f"rgb: expected a float tensor in [0, 1], actual dtype: {rgb.dtype}")
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb: expected shape [B, 3, {s}, {s}] (channels first), actual shape: "
                         f"{tuple(rgb.shape)}")
    if rgb.shape[-2:] != (s, s):
        raise ValueError(f"rgb: expected {s}x{s} images (config.image_size), actual size: "
                         f"{rgb.shape[-2]}x{rgb.shape[-1]}; resize the observations or pick "
                         f"another preset")
    b = rgb.shape[0]
    if cfg.use_depth and depth is None:
        raise ValueError("depth: this model has config.use_depth=True and needs depth [B, 1, H, W] "
                         "(raw metric depth) at every step")
    if depth is not None:
        if not isinstance(depth, torch.Tensor):
            raise TypeError(f"depth: expected a torch.Tensor [B,1,{s},{s}], actual type: "
                            f"{type(depth).__name__}")
        if depth.shape != (b, 1, s, s):
            raise ValueError(f"depth: expected shape [{b}, 1, {s}, {s}], actual shape: "
                             f"{tuple(depth.shape)}")
    if state is not None:
        if not isinstance(state, TensorDict) or state_key not in state.keys():
            raise TypeError(f"state: expected a TensorDict from this model's init_state, actual: "
                            f"{type(state).__name__}")
        if state.device is not None and state.device.type != rgb.device.type:
            raise ValueError(f"state is on {state.device} but rgb on {rgb.device}; move one of them "
                             f"(state.to(device) / rgb.to(device))")
        if state.batch_size[0] != b:
            raise ValueError(f"state: batch size {state.batch_size[0]} does not match rgb batch "
                             f"size {b}")
    if check_values:
        finite = torch.isfinite(rgb).all()
        true = torch.ones((), dtype=torch.bool, device=rgb.device)
        in_range = (rgb.amin() >= 0) & (rgb.amax() <= 1) if rgb.numel() else true
        ok_depth = true
        if depth is not None and depth.is_floating_point():
            ok_depth = ~torch.isnan(depth).any()
        flags = torch.stack([finite, in_range, ok_depth]).cpu().tolist()
        if not flags[0]:
            raise ValueError("rgb: contains NaN or inf values")
        if not flags[1]:
            raise ValueError(f"rgb: expected values in [0, 1], actual range: "
                             f"[{rgb.amin().item():.4g}, {rgb.amax().item():.4g}]; divide by 255?")
        if not flags[2]:
            raise ValueError("depth: contains NaN values (use +inf or 0 for invalid pixels)")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class LociS(nn.Module):
    """Loci-s with an explicit per-row recurrent state.

    Args:
        config: a :class:`LociSConfig` or a preset name (``"tiny"``, ``"small"``, ``"paper"``).

    Submodules: ``background`` (:class:`BackgroundModule`), ``proposals`` (:class:`ProposalNet`),
    ``encoder`` (:class:`HyperConvNeXtEncoder`), ``percept_gate`` (:class:`PerceptGate`),
    ``transition`` (:class:`SlotTransition`), ``decoder`` (:class:`CascadedDecoder`).

    State keys (``B`` rows, ``K`` slots, ``G`` Gestalt, ``L`` transition layers, ``H = W``):
        ``position [B,K,4]``, ``gestalt [B,K,G]`` predicted codes for the coming frame;
        ``last_position [B,K,4]``; ``hidden [B,K,L,hidden]``; ``presence [B,K]`` float;
        ``new_slots [B,K]`` bool (slots assigned after the last frame: the gate takes their
        observation as prediction); ``slot_rgb [B,K,3,H,W]``, ``slot_depth [B,K,1,H,W]``,
        ``object_masks [B,K,H,W]``, ``visible_masks [B,K+1,H,W]``, ``predicted_rgb [B,3,H,W]``
        (predictions of the coming frame); ``initialized [B]`` bool; ``frame_index [B]`` int64;
        ``rng_seed [B]`` int64 (per-row randomness).

    Example:
        >>> model = LociS("tiny").eval()
        >>> out, state = model.step(torch.rand(1, 3, 64, 64), state=model.init_state(1, seed=0))
        >>> sorted(out.keys())[:3]
        ['background_depth', 'background_rgb', 'depth']
    """

    def __init__(self, config: LociSConfig | str = "paper") -> None:
        super().__init__()
        if isinstance(config, str):
            config = LociSConfig.preset(config)
        if not isinstance(config, LociSConfig):
            raise TypeError(f"config: expected a LociSConfig or a preset name, actual value: {config!r}")
        self.config = config.validate()
        self.background = BackgroundModule(config)
        self.proposals = ProposalNet(config)
        self.encoder = HyperConvNeXtEncoder(config)
        self.percept_gate = PerceptGate(config)
        self.transition = SlotTransition(config)
        self.decoder = CascadedDecoder(config)
        self.check_inputs = True
        """Validate ``rgb`` / ``depth`` values in :meth:`step` (one host sync); shapes always are."""

    # ---- state ------------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

    def init_state(self, batch_size: int, device: torch.device | str | None = None, *,
                   seed: int | torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> TensorDict:
        """A fresh state for ``batch_size`` rows (all ``initialized=False``).

        Args:
            seed: ``int`` -> per-row seeds hashed from ``(seed, row index)``; an int64 tensor
                ``[B]`` -> used as the rows' seeds; ``None`` -> drawn from ``generator`` (or torch's
                global generator).

        Returns:
            TensorDict with ``batch_size [B]`` (keys: see the class docstring).
        """
        cfg = self.config
        param_device, dtype = self._device_dtype()
        device = torch.device(device) if device is not None else param_device
        b, k, s, g = int(batch_size), cfg.num_slots, cfg.image_size, cfg.gestalt_dim
        rows = torch.arange(b, device=device, dtype=torch.int64)
        if seed is None:
            seeds = torch.randint(0, 2 ** 62, (b,), generator=generator,
                                  device=generator.device if generator is not None else "cpu")
            seeds = seeds.to(device)
        elif isinstance(seed, torch.Tensor):
            if seed.shape != (b,):
                raise ValueError(f"seed: expected an int or an int64 tensor of shape [{b}], actual "
                                 f"shape: {tuple(seed.shape)}")
            seeds = seed.to(device=device, dtype=torch.int64)
        else:
            seeds = _seeds_from_int(int(seed), rows)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(b, *shape, device=device, dtype=dtype)

        visible = zeros(k + 1, s, s)
        visible[:, k] = 1.0  # everything is background before the first frame
        return TensorDict({
            "position": zeros(k, 4),
            "gestalt": zeros(k, g),
            "last_position": zeros(k, 4),
            "hidden": self.transition.init_hidden(b, k, device=device, dtype=dtype),
            "presence": zeros(k),
            "new_slots": torch.zeros(b, k, dtype=torch.bool, device=device),
            "slot_rgb": zeros(k, 3, s, s),
            "slot_depth": zeros(k, 1, s, s),
            "object_masks": zeros(k, s, s),
            "visible_masks": visible,
            "predicted_rgb": zeros(3, s, s),
            "initialized": torch.zeros(b, dtype=torch.bool, device=device),
            "frame_index": torch.zeros(b, dtype=torch.int64, device=device),
            "rng_seed": seeds,
        }, batch_size=[b], device=device)

    def reset_state(self, state: TensorDict, mask: torch.Tensor, *,
                    seed: int | torch.Tensor | None = None) -> TensorDict:
        """Re-initialise the rows in ``mask [B]`` (bool); the other rows are kept bit for bit.

        Seeds of reset rows: ``seed`` as in :meth:`init_state` (an int hashes with the row index,
        so ``reset_state(s, m, seed=n)`` rows equal ``init_state(B, seed=n)`` rows); ``None``
        derives a new seed from the row's old seed and frame index (deterministic, per row).

        Returns:
            a new TensorDict (the input is not modified).
        """
        b = state.batch_size[0]
        mask = torch.as_tensor(mask, device=state.device)
        if mask.dtype != torch.bool or mask.shape != (b,):
            raise ValueError(f"mask: expected a bool tensor of shape [{b}], actual: dtype "
                             f"{mask.dtype}, shape {tuple(mask.shape)}")
        if seed is None:
            old = state["rng_seed"]
            key = _row_key(old, state["frame_index"], _STREAM_RESEED)
            seed = ((_hash32(key ^ 0x27D4EB2F) & 0x3FFFFFFF) << 32) | _hash32(key)
        fresh = self.init_state(b, state.device, seed=seed)
        return rows_where(mask, fresh, state)

    @staticmethod
    def detach_state(state: TensorDict) -> TensorDict:
        """The same state cut from the autograd graph (truncated BPTT); a new TensorDict."""
        return state.detach()

    # ---- input validation ---------------------------------------------------------------------
    def _validate(self, rgb: Any, depth: Any, state: TensorDict | None) -> None:
        validate_step_inputs(self.config, rgb, depth, state, check_values=self.check_inputs)

    # ---- building blocks of a step ------------------------------------------------------------
    def _encoder_inputs(self, rgb: torch.Tensor, error: torch.Tensor, background_mask: torch.Tensor,
                        scene_depth: torch.Tensor | None, position: torch.Tensor,
                        visible: torch.Tensor, objects: torch.Tensor, slot_rgb: torch.Tensor,
                        slot_depth: torch.Tensor) -> torch.Tensor:
        """Per-slot encoder input stack, built with broadcasting.

        Args:
            rgb ``[B,3,H,W]``, error ``[B,1,H,W]``, background_mask ``[B,1,H,W]``,
            scene_depth ``[B,1,H,W]`` or None, position ``[B,K,4]``, visible ``[B,K+1,H,W]``,
            objects ``[B,K,H,W]``, slot_rgb ``[B,K,3,H,W]``, slot_depth ``[B,K,1,H,W]``.

        Returns:
            ``[B*K, C_in, H, W]``: frame | error | background mask | position Gaussian | visible
            mask | object mask | slot RGB | other slots' visible masks (| scene depth | slot depth).
        """
        b, k = position.shape[:2]
        h, w = rgb.shape[-2:]
        slot_visible = visible[:, :k]
        others = slot_visible.sum(dim=1, keepdim=True) - slot_visible
        gauss = gaussian_heatmap(position, h, w)
        scene = torch.cat([rgb, error, background_mask], dim=1)[:, None].expand(b, k, 5, h, w)
        parts = [scene, torch.stack([gauss, slot_visible, objects], dim=2), slot_rgb, others[:, :, None]]
        if scene_depth is not None:
            parts += [scene_depth[:, None].expand(b, k, 1, h, w), slot_depth]
        return torch.cat(parts, dim=2).reshape(b * k, -1, h, w)

    def _decode(self, position: torch.Tensor, gestalt: torch.Tensor, presence: torch.Tensor,
                background_rgb: torch.Tensor, background_depth: torch.Tensor, rgb: bool = True
                ) -> dict[str, torch.Tensor]:
        """Decode ``[B,K]`` slot codes and compose them over the background.

        Returns:
            dict(mask_logits ``[B,K,1,H,W]``, slot_rgb ``[B,K,3,H,W]``, slot_depth ``[B,K,1,H,W]``,
            masks ``[B,K+1,H,W]``, object_masks ``[B,K,H,W]`` (presence applied), rgb ``[B,3,H,W]``,
            depth ``[B,1,H,W]``); without ``slot_rgb`` and ``rgb`` when ``rgb=False``.
        """
        b, k = position.shape[:2]
        dec = self.decoder(position.reshape(b * k, 4), gestalt.reshape(b * k, -1), rgb=rgb)
        h, w = dec["mask_logits"].shape[-2:]
        mask_logits = dec["mask_logits"].view(b, k, 1, h, w)
        slot_rgb = dec["rgb"].view(b, k, 3, h, w) if rgb else None
        slot_depth = dec["depth"].view(b, k, 1, h, w)
        comp = self.decoder.compose(mask_logits, position[..., 3], presence, slot_rgb, slot_depth,
                                    background_rgb, background_depth)
        out = {"mask_logits": mask_logits, "slot_depth": slot_depth, **comp}
        if rgb:
            out["slot_rgb"] = slot_rgb
        return out

    def _instances(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposal instances: masks ``[B,Q,H,W]`` in {0,1} and valid ``[B,Q]`` (no gradient)."""
        pred = self.proposals.predict_instances(image)
        return pred["masks"], pred["valid"]

    def warmup(self, image: torch.Tensor, rgb: torch.Tensor, scene_depth: torch.Tensor | None,
               foreground: torch.Tensor, background_rgb: torch.Tensor, background_depth: torch.Tensor,
               seed: torch.Tensor, frame_index: torch.Tensor, *, mode: str,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Initial slot assignment and encoder-decoder warm-up on a first frame (section 3.6, 4).

        ``config.assignment.warmup_train`` passes in training, ``warmup_inference`` in eval; each
        pass encodes the frame with the slots' current position / masks / RGB / depth and feeds the
        decoded ones back (``seg``: the proposal instance masks replace the decoded object masks).
        The Gestalt prior starts at zeros. No transition.

        Args: (``b`` = the rows being initialised) image ``[b,C,H,W]``, rgb ``[b,3,H,W]``,
            scene_depth ``[b,1,H,W]`` or None, foreground ``[b,1,H,W]``, background_rgb / _depth,
            seed / frame_index ``[b]`` int64.

        Returns:
            dict of slot tensors for those rows: position, gestalt, presence ``[b,K]``,
            visible_masks, object_masks, slot_rgb, slot_depth.
        """
        cfg = self.config
        b = rgb.shape[0]
        k, g, h, w = cfg.num_slots, cfg.gestalt_dim, rgb.shape[-2], rgb.shape[-1]
        dtype = rgb.dtype
        free = torch.ones(b, k, dtype=torch.bool, device=rgb.device)
        teacher = None
        if generator is not None:
            sampled = sample_free_slot_positions(foreground[:, 0], free, cfg.assignment.initial_size, generator)
        else:
            u = row_uniform(seed, frame_index, _STREAM_INITIAL, k, dtype=dtype)
            sampled = _sample_positions_rowwise(foreground[:, 0], u, cfg.assignment.initial_size)
        position, presence = sampled, torch.ones(b, k, dtype=dtype, device=rgb.device)
        if mode == "seg":
            inst_masks, valid = self._instances(image)
            inst_pos = positions_from_masks(inst_masks, valid)
            proposed, assigned, teacher = assign_to_free_slots(inst_pos, valid, inst_masks, free)
            # A row for which the proposal network finds nothing (untrained, or an unfamiliar
            # scene) falls back to sampling in the uncertainty map, as `rnd` does: a row without
            # slots would never see an object again until a proposal appears.
            use_proposals = valid.any(dim=1, keepdim=True)
            position = torch.where(use_proposals[..., None], proposed, sampled)
            presence = torch.where(use_proposals, assigned.to(dtype), presence)
        gestalt = rgb.new_zeros(b, k, g)
        visible = torch.cat([rgb.new_zeros(b, k, h, w), rgb.new_ones(b, 1, h, w)], dim=1)
        objects = teacher if teacher is not None else rgb.new_zeros(b, k, h, w)
        slot_rgb = rgb.new_zeros(b, k, 3, h, w)
        slot_depth = rgb.new_zeros(b, k, 1, h, w)
        error = rgb.new_zeros(b, 1, h, w)
        background_mask = 1.0 - foreground
        iterations = cfg.assignment.warmup_train if self.training else cfg.assignment.warmup_inference
        for it in range(iterations):
            inputs = self._encoder_inputs(rgb, error, background_mask, scene_depth, position, visible,
                                          objects, slot_rgb, slot_depth)
            pos_flat, gestalt_flat = self.encoder(inputs, gestalt.reshape(b * k, g))
            position, gestalt = pos_flat.view(b, k, 4), gestalt_flat.view(b, k, g)
            if mode == "reg":
                if generator is not None:
                    presence = regularize_slots(position, gestalt, presence, cfg.assignment, generator)
                else:
                    u = row_uniform(seed, frame_index, _STREAM_REGULARIZE + 16 * (it + 1), k, k, dtype=dtype)
                    presence = _regularize_rowwise(position, gestalt, presence, cfg.assignment, u)
            dec = self._decode(position, gestalt, presence, background_rgb, background_depth)
            visible, slot_rgb, slot_depth = dec["masks"], dec["slot_rgb"], dec["slot_depth"]
            objects = dec["object_masks"]
            if teacher is not None:
                objects = torch.where(presence[..., None, None] > 0, teacher, objects)
        return {"position": position, "gestalt": gestalt, "presence": presence, "visible_masks": visible,
                "object_masks": objects, "slot_rgb": slot_rgb, "slot_depth": slot_depth}

    # ---- the step -----------------------------------------------------------------------------
    def step(self, rgb: torch.Tensor, depth: torch.Tensor | None = None, state: TensorDict | None = None,
             *, mode: str | None = None, generator: torch.Generator | None = None,
             reconstruct_rgb: bool = True) -> tuple[TensorDict, TensorDict]:
        """One perception step on a batch of frames.

        Args:
            rgb: ``[B, 3, H, W]`` float in ``[0, 1]`` with ``H = W = config.image_size``.
            depth: ``[B, 1, H, W]`` raw metric depth (required when ``config.use_depth``, ignored
                otherwise); non-finite or non-positive pixels count as invalid.
            state: from :meth:`init_state` / a previous step; ``None`` = a fresh state.
            mode: slot assignment ``"rnd" | "reg" | "seg"`` (default ``config.assignment.mode``).
            generator: ``None`` (default) -> per-row counter-based randomness from
                ``state["rng_seed"]`` (rows independent). A ``torch.Generator`` -> the component
                samplers draw from that one shared stream instead (rows then share it).
            reconstruct_rgb: ``False`` skips the RGB decoder for the current frame, so ``out`` has
                no ``rgb`` / ``slot_rgb``. Features, masks, depth and the new state are the same
                (RGB is the cascade's last stage; the next-frame prediction in the state is always
                decoded in full). The RL adapters use it: 10-25 % less time per step on CPU.

        Returns:
            ``(out, state)``, both TensorDicts with ``batch_size [B]``; ``state`` is new (the input is
            not modified). ``out`` keys (current frame unless ``next_``):
            ``position [B,K,4]``, ``gestalt [B,K,G]`` (after the percept gate), ``presence [B,K]``,
            ``masks [B,K+1,H,W]`` visible masks (background last), ``object_masks [B,K,H,W]``,
            ``slot_depth [B,K,1]`` (mask-weighted mean), ``slot_depth_map [B,K,1,H,W]``,
            ``slot_rgb [B,K,3,H,W]``, ``rgb [B,3,H,W]`` / ``depth [B,1,H,W]`` reconstructions,
            ``background_rgb``, ``background_depth``, ``foreground [B,1,H,W]``,
            ``foreground_logits``, ``gate [B,K,2]`` (alpha_G, alpha_P), ``observed_position``,
            ``observed_gestalt`` (encoder output), ``next_position``, ``next_gestalt``,
            ``next_presence``, ``next_masks [B,K+1,H,W]``, ``next_rgb [B,3,H,W]``,
            ``next_depth [B,1,H,W]``, ``l0 [B]`` (weighted gate + transition L0), ``gate_l0``,
            ``transition_l0`` (unweighted), and ``scene_depth [B,1,H,W]`` with ``use_depth``.
        """
        self._validate(rgb, depth, state)
        cfg = self.config
        mode = cfg.assignment.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, actual value: {mode!r}")
        b = rgb.shape[0]
        k, g = cfg.num_slots, cfg.gestalt_dim
        h = w = cfg.image_size
        if state is None:
            state = self.init_state(b, rgb.device, generator=generator)
        _, dtype = self._device_dtype()
        rgb = rgb.to(dtype)

        # 1. scene-relative depth, 2. background module
        scene_depth = scene_relative_depth(depth.to(dtype)) if cfg.use_depth else None
        image = torch.cat([rgb, scene_depth], dim=1) if scene_depth is not None else rgb
        bg = self.background(image)
        foreground, background_rgb, background_depth = bg["foreground"], bg["rgb"], bg["depth"]

        # 3. first frame of a row: slot assignment + warm-up on the subset of fresh rows
        first = ~state["initialized"]
        prior = state.exclude("initialized", "frame_index", "rng_seed")
        fresh_rows = first.nonzero().squeeze(1)
        if fresh_rows.numel() > 0:
            pick = lambda x: x.index_select(0, fresh_rows)  # noqa: E731
            warm = self.warmup(pick(image), pick(rgb), None if scene_depth is None else pick(scene_depth),
                               pick(foreground), pick(background_rgb), pick(background_depth),
                               pick(state["rng_seed"]), pick(state["frame_index"]), mode=mode,
                               generator=generator)
            warm["last_position"] = warm["position"]
            warm["predicted_rgb"] = rgb.index_select(0, fresh_rows)  # error 0 on the first frame
            warm["new_slots"] = torch.ones(fresh_rows.numel(), k, dtype=torch.bool, device=rgb.device)
            updates = {}
            for key, value in warm.items():
                updates[key] = prior[key].index_copy(0, fresh_rows, value.to(prior[key].dtype))
            updates["hidden"] = torch.where(first[:, None, None, None],
                                            torch.zeros_like(prior["hidden"]), prior["hidden"])
            prior = TensorDict(updates, batch_size=[b], device=prior.device)

        # 4. main pass for all rows
        presence = prior["presence"]
        error = (rgb - prior["predicted_rgb"]).abs().mean(dim=1, keepdim=True).detach()
        error = error * (~first).to(dtype)[:, None, None, None]
        inputs = self._encoder_inputs(rgb, error, 1.0 - foreground, scene_depth, prior["position"],
                                      prior["visible_masks"], prior["object_masks"], prior["slot_rgb"],
                                      prior["slot_depth"])
        obs_pos, obs_gestalt = self.encoder(inputs, prior["gestalt"].reshape(b * k, g))
        obs_pos, obs_gestalt = obs_pos.view(b, k, 4), obs_gestalt.view(b, k, g)
        observed_as_prediction = prior["new_slots"] | first[:, None]
        pred_pos = torch.where(observed_as_prediction[..., None], obs_pos, prior["position"])
        pred_gestalt = torch.where(observed_as_prediction[..., None], obs_gestalt, prior["gestalt"])
        gate = self.percept_gate(obs_pos, obs_gestalt, pred_pos, pred_gestalt, prior["last_position"])
        position, gestalt = gate["position"], gate["gestalt"]
        current = self._decode(position, gestalt, presence, background_rgb, background_depth,
                               rgb=reconstruct_rgb)

        # 5a. release slots whose decoded (unoccluded) mask is tiny
        unoccluded = torch.sigmoid(current["mask_logits"][:, :, 0])
        mass = unoccluded.sum(dim=(-2, -1))
        min_mass = cfg.assignment.presence_threshold * cfg.assignment.new_object_fraction * h * w
        next_presence = presence * (mass >= min_mass).to(dtype)

        # transition -> next-frame codes -> next-frame prediction
        trans = self.transition(position, gestalt, prior["hidden"], presence)
        next_pos, next_gestalt, hidden = trans["position"], trans["gestalt"], trans["hidden"]
        nxt = self._decode(next_pos, next_gestalt, next_presence, background_rgb, background_depth)

        # 5b. free slots take new objects where the foreground is unexplained
        new_pos, new_mask, new_objects = self._new_objects(
            image, foreground, current["object_masks"] * next_presence[..., None, None].clamp(0, 1),
            next_presence, state["rng_seed"], state["frame_index"], mode, generator)
        nm = new_mask[..., None]
        next_pos = torch.where(nm, new_pos, next_pos)
        next_gestalt = torch.where(nm, torch.zeros_like(next_gestalt), next_gestalt)
        hidden = torch.where(nm[..., None], torch.zeros_like(hidden), hidden)
        next_presence = torch.where(new_mask, torch.ones_like(next_presence), next_presence)
        last_position = torch.where(nm, new_pos, position)
        next_objects = torch.where(new_mask[..., None, None], new_objects, nxt["object_masks"])
        nm5 = new_mask[..., None, None, None]
        next_slot_rgb = torch.where(nm5, torch.zeros_like(nxt["slot_rgb"]), nxt["slot_rgb"])
        next_slot_depth = torch.where(nm5, torch.zeros_like(nxt["slot_depth"]), nxt["slot_depth"])

        new_state = TensorDict({
            "position": next_pos,
            "gestalt": next_gestalt,
            "last_position": last_position,
            "hidden": hidden,
            "presence": next_presence,
            "new_slots": new_mask,
            "slot_rgb": next_slot_rgb,
            "slot_depth": next_slot_depth,
            "object_masks": next_objects,
            "visible_masks": nxt["masks"],
            "predicted_rgb": nxt["rgb"],
            "initialized": torch.ones_like(first),
            "frame_index": state["frame_index"] + 1,
            "rng_seed": state["rng_seed"],
        }, batch_size=[b], device=state.device)

        # 6. outputs
        weight = unoccluded[:, :, None]
        slot_depth_mean = ((weight * current["slot_depth"]).sum(dim=(-2, -1))
                           / weight.sum(dim=(-2, -1)).clamp_min(1e-6))
        l0 = (cfg.percept_gate.l0_weight * gate["l0"] + cfg.transition.l0_weight * trans["l0"])
        out = TensorDict({
            "position": position,
            "gestalt": gestalt,
            "presence": presence,
            "masks": current["masks"],
            "object_masks": current["object_masks"],
            "slot_depth": slot_depth_mean,
            "slot_depth_map": current["slot_depth"],
            "depth": current["depth"],
            "background_rgb": background_rgb,
            "background_depth": background_depth,
            "foreground": foreground,
            "foreground_logits": bg["foreground_logits"],
            "gate": gate["gate"],
            "observed_position": obs_pos,
            "observed_gestalt": obs_gestalt,
            "next_position": next_pos,
            "next_gestalt": next_gestalt,
            "next_presence": next_presence,
            "next_masks": nxt["masks"],
            "next_rgb": nxt["rgb"],
            "next_depth": nxt["depth"],
            "l0": l0,
            "gate_l0": gate["l0"],
            "transition_l0": trans["l0"],
        }, batch_size=[b], device=state.device)
        if reconstruct_rgb:
            out["slot_rgb"], out["rgb"] = current["slot_rgb"], current["rgb"]
        if scene_depth is not None:
            out["scene_depth"] = scene_depth
        return out, new_state

    forward = step

    def _new_objects(self, image: torch.Tensor, foreground: torch.Tensor, present_masks: torch.Tensor,
                     presence: torch.Tensor, seed: torch.Tensor, frame_index: torch.Tensor, mode: str,
                     generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Assign free slots to foreground that no present slot explains (step 5).

        Args:
            image ``[B,C,H,W]``, foreground ``[B,1,H,W]``, present_masks ``[B,K,H,W]`` (unoccluded
            masks of the slots that stay present), presence ``[B,K]``, seed / frame_index ``[B]``.

        Returns:
            position ``[B,K,4]``, assigned ``[B,K]`` bool, object masks ``[B,K,H,W]`` (``seg``: the
            proposal masks of the new slots; zeros otherwise). In ``seg`` mode a row without a new
            proposal falls back to sampling in the unexplained foreground.
        """
        cfg = self.config
        b, k, h, w = present_masks.shape
        free = presence <= PRESENT_THRESHOLD
        unexplained = unexplained_foreground(foreground, present_masks, presence)  # [B,H,W]
        need = (unexplained.mean(dim=(1, 2)) > cfg.assignment.new_object_fraction) & free.any(dim=1)
        zeros_masks = present_masks.new_zeros(b, k, h, w)
        if generator is not None:
            pos = sample_free_slot_positions(unexplained, free, cfg.assignment.initial_size, generator)
        else:
            u = row_uniform(seed, frame_index, _STREAM_NEW_OBJECT, k, dtype=present_masks.dtype)
            pos = _sample_positions_rowwise(unexplained, u, cfg.assignment.initial_size)
        # one new object per row and frame: the first free slot (several samples from the same
        # map would mostly land on the same object)
        first_free = free & (free.long().cumsum(dim=1) == 1)
        sampled_assigned = first_free & need[:, None]
        if mode != "seg":
            return pos, sampled_assigned, zeros_masks
        rows = need.nonzero().squeeze(1)
        if rows.numel() == 0:
            return pos, sampled_assigned, zeros_masks
        masks, valid = self._instances(image.index_select(0, rows))
        covered = 1.0 - (1.0 - present_masks.index_select(0, rows).clamp(0, 1)).prod(dim=1)  # [r,H,W]
        inside = (masks * covered[:, None]).sum(dim=(-2, -1)) / masks.sum(dim=(-2, -1)).clamp_min(1.0)
        valid = valid & (inside <= PROPOSAL_COVERED_FRACTION)
        prop_pos, got, slot_masks = assign_to_free_slots(positions_from_masks(masks, valid), valid, masks,
                                                         free.index_select(0, rows))
        # Rows whose unexplained foreground has no new proposal keep the sampled slot (as in
        # warm-up): the proposal network may miss objects the uncertainty map sees.
        use_proposals = torch.zeros(b, dtype=torch.bool, device=presence.device)
        use_proposals = use_proposals.index_copy(0, rows, got.any(dim=1))
        position = pos.index_copy(0, rows, torch.where(got[..., None], prop_pos.to(pos.dtype),
                                                        pos.index_select(0, rows)))
        assigned = torch.where(use_proposals[:, None],
                               sampled_assigned.index_copy(0, rows, got), sampled_assigned)
        object_masks = zeros_masks.index_copy(0, rows, slot_masks.to(zeros_masks.dtype))
        return position, assigned, object_masks

    # ---- losses -------------------------------------------------------------------------------
    def loss(self, out: TensorDict, target_rgb: torch.Tensor, target_depth: torch.Tensor | None = None,
             next_rgb: torch.Tensor | None = None, next_depth: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        """Training loss of one step.

        Args:
            out: from :meth:`step`. target_rgb ``[B,3,H,W]`` (the frame given to the step);
            target_depth ``[B,1,H,W]`` raw metric (used when ``config.use_depth``; compared in
            scene-relative units); next_rgb / next_depth: the following frame (prediction loss).

        Returns:
            dict of scalars: ``rgb``, (``depth``), (``next_rgb``, ``next_depth``), ``l0`` (weighted gate
            + transition L0) and ``total``.
        """
        terms: dict[str, torch.Tensor] = {"rgb": F.mse_loss(out["rgb"], target_rgb)}
        use_depth = self.config.use_depth
        if use_depth and target_depth is not None:
            terms["depth"] = F.mse_loss(out["depth"], scene_relative_depth(target_depth))
        if next_rgb is not None:
            terms["next_rgb"] = F.mse_loss(out["next_rgb"], next_rgb)
        if use_depth and next_depth is not None:
            terms["next_depth"] = F.mse_loss(out["next_depth"], scene_relative_depth(next_depth))
        terms["l0"] = out["l0"].mean()
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    # ---- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint atomically (temporary file + ``os.replace``). Returns the path.

        Layout: see :mod:`locis_rl.model.checkpoint_io` (``"model": "LociS"``).
        """
        return save_model_checkpoint(self, "LociS", path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = "default", map_location: Any = "cpu", *,
                        config: LociSConfig | str | None = None,
                        overrides: Mapping[str, Any] | None = None) -> "LociS":
        """Load a checkpoint written by :meth:`save_pretrained`.

        Args:
            path: a file, or a packaged name: ``"default"`` (``locis_rl/checkpoints/default.pt``,
                RGB input) or ``"depth"`` (``depth.pt``, RGB + depth input).
            map_location: passed to ``torch.load``.
            config: expected config; every field must equal the config the model is built with
                (the checkpoint's, after ``overrides``), else :class:`CheckpointError`.
                ``None``: the checkpoint's own config (after ``overrides``).
            overrides: inference-time changes of the checkpoint's config, dotted or nested keys,
                e.g. ``{"num_slots": 10, "assignment.mode": "reg"}``. Only the fields of
                :data:`~locis_rl.model.config.INFERENCE_OVERRIDE_KEYS` are allowed: none of them
                changes a parameter shape, so the weights load unchanged. ``num_slots`` sets ``K``
                of the state and outputs (``position [B,K,4]``, ``masks [B,K+1,H,W]``, ...): every
                slot module is shared across slots, so a 6-slot model can run with 10 slots on
                busier scenes (how well depends on the scenes it was trained on).

        Example:
            >>> model = LociS.from_pretrained("model.pt", overrides={"num_slots": 10})  # doctest: +SKIP
            >>> model.init_state(1)["position"].shape  # doctest: +SKIP
            torch.Size([1, 10, 4])

        Raises:
            FileNotFoundError: no such file (the message says how to train one).
            CheckpointError: foreign file, wrong ``format_version``, missing keys, config or
                parameter shape mismatches (named in the message).
            ConfigError: an override key that is unknown or may not change (the message lists the
                allowed keys), or a bad override value (e.g. ``num_slots=0``).
        """
        flat = inference_overrides(overrides)  # checked before the file is read
        path = pretrained_checkpoint(path) or Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no Loci-s checkpoint at {path}; train one with `python -m locis_rl.pretrain` "
                f"(or pass the path of a checkpoint written by LociS.save_pretrained)")
        expected = LociSConfig.preset(config) if isinstance(config, str) else config
        return load_model_checkpoint(
            path, model_name="LociS", config_from_dict=LociSConfig.from_dict, build=cls,
            expected_config=expected, map_location=map_location,
            wrong_model_hints={"SAVi": "; load it with locis_rl.savi.SAVi.from_pretrained"},
            adjust_config=(lambda saved: apply_inference_overrides(saved, flat)) if flat else None)

    def extra_repr(self) -> str:
        c = self.config
        return (f"image_size={c.image_size}, num_slots={c.num_slots}, gestalt_dim={c.gestalt_dim}, "
                f"use_depth={c.use_depth}, mode={c.assignment.mode!r}")
