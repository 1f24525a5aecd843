"""Initial slot assignment and free slots for new objects (paper section 3.6).

Three strategies build on these vectorised helpers (no Python loops over slots or batch rows):

- ``rnd``: :func:`sample_free_slot_positions` draws a position for each free slot from the
  foreground (uncertainty) map.
- ``reg``: the same, plus :func:`regularize_slots` after each warm-up pass, which stochastically
  nullifies one slot of every near-duplicate pair (close positions and correlated Gestalt codes).
- ``seg``: :func:`positions_from_masks` turns proposal instance masks into position codes and
  :func:`assign_to_free_slots` hands them to free slots in order.

:func:`unexplained_foreground` gives the foreground not yet covered by present slots, the map to
sample from (or to threshold) when objects enter the scene later.

Sampling always takes an explicit ``generator: torch.Generator | None`` (on the tensors' device), so
runs are reproducible independently of ``module.training``.

Coordinates follow :func:`locis_rl.model.blocks.coordinate_grid`: pixel centres,
``x = -1 + 2 * col / (W - 1)``, ``y = -1 + 2 * row / (H - 1)``.
"""
from __future__ import annotations

import torch

from locis_rl.model.blocks import coordinate_grid
from locis_rl.model.config import AssignmentConfig

__all__ = [
    "sample_free_slot_positions",
    "regularize_slots",
    "positions_from_masks",
    "assign_to_free_slots",
    "assign_proposals_to_free_slots",
    "unexplained_foreground",
    "PRESENT_THRESHOLD",
    "MIN_MASK_SIZE",
    "MAX_MASK_SIZE",
]

PRESENT_THRESHOLD = 0.5
"""A float ``presence`` above this counts as present in :func:`regularize_slots`."""
MIN_MASK_SIZE = 1e-2
"""Lower clamp of the size derived from a mask (normalised units)."""
MAX_MASK_SIZE = 1.0
"""Upper clamp of the size derived from a mask (normalised units)."""


def _pixel_to_coordinate(index: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    if length <= 1:
        return torch.zeros(index.shape, dtype=dtype, device=index.device)
    return -1.0 + 2.0 * index.to(dtype) / (length - 1)


def sample_free_slot_positions(weights: torch.Tensor, free: torch.Tensor, size: float,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample a position for every free slot, pixel probability proportional to ``weights``.

    Args:
        weights: ``[B, H, W]`` non-negative map (e.g. foreground probability); negative and
            non-finite values count as 0; a row whose total weight is 0 falls back to uniform.
        free: ``[B, K]`` bool, slots to fill.
        size: the size (Gaussian std) given to every sampled slot.
        generator: random source for ``torch.multinomial`` (``None``: the global one).

    Returns:
        ``[B, K, 4]`` codes ``(x, y, size, priority=0)`` for free slots, zeros elsewhere (merge with
        ``torch.where``).
    """
    b, h, w = weights.shape
    k = free.shape[1]
    dtype = weights.dtype if weights.is_floating_point() else torch.get_default_dtype()
    flat = weights.reshape(b, h * w).to(dtype)
    flat = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat)).clamp_min(0.0)
    empty = flat.sum(dim=1, keepdim=True) <= 0
    flat = torch.where(empty, torch.ones_like(flat), flat)
    if k == 0:
        return torch.zeros(b, 0, 4, dtype=dtype, device=weights.device)
    index = torch.multinomial(flat, k, replacement=True, generator=generator)  # [B, K]
    x = _pixel_to_coordinate(index % w, w, dtype)
    y = _pixel_to_coordinate(torch.div(index, w, rounding_mode="floor"), h, dtype)
    position = torch.stack([x, y, torch.full_like(x, float(size)), torch.zeros_like(x)], dim=-1)
    return position * free.to(dtype)[..., None]


def regularize_slots(position: torch.Tensor, gestalt: torch.Tensor, presence: torch.Tensor,
                     cfg: AssignmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastically nullify one slot of each near-duplicate pair (``reg`` strategy).

    A pair ``(i, j)``, ``i < j``, both present, is a duplicate when the Euclidean distance of their
    ``(x, y)`` is below ``cfg.reg_distance`` and the Pearson correlation of their Gestalt codes is
    above ``cfg.reg_correlation``. With probability ``cfg.reg_drop_probability`` (one coin per pair)
    the slot with the larger index, ``j``, is nullified. The lowest-index slot of any group of
    duplicates is never dropped, so a duplicate group always keeps at least one slot.

    Args:
        position: ``[B, K, 4]``; gestalt: ``[B, K, G]``; presence: ``[B, K]`` (bool or float).

    Returns:
        presence ``[B, K]`` of the same dtype with dropped slots set to 0 / False.
    """
    b, k, _ = position.shape
    present = presence if presence.dtype == torch.bool else presence > PRESENT_THRESHOLD
    xy = position[..., :2]
    distance = torch.cdist(xy, xy)  # [B, K, K]
    centred = gestalt - gestalt.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    unit = centred / norm
    correlation = unit @ unit.transpose(-1, -2)  # [B, K, K]
    upper = torch.ones(k, k, dtype=torch.bool, device=position.device).triu(diagonal=1)
    duplicate = (upper[None] & present[:, :, None] & present[:, None, :]
                 & (distance < cfg.reg_distance) & (correlation > cfg.reg_correlation))
    coin = torch.rand(b, k, k, generator=generator, device=position.device,
                      dtype=distance.dtype) < cfg.reg_drop_probability
    drop = (duplicate & coin).any(dim=1)  # [B, K]: column j = the larger index of the pair
    return torch.where(drop, torch.zeros_like(presence), presence)


def positions_from_masks(masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Position codes of (soft) instance masks.

    ``(x, y)`` is the mask-weighted centroid; ``size`` the per-axis std of an isotropic Gaussian with
    the same spread, ``sqrt(mean squared distance to the centroid / 2)`` (so a Gaussian blob of std
    ``s`` gives ``s``), clamped to ``[MIN_MASK_SIZE, MAX_MASK_SIZE]``; priority 0.

    Args:
        masks: ``[B, Q, H, W]`` in ``[0, 1]``; valid: ``[B, Q]`` bool.

    Returns:
        ``[B, Q, 4]``; invalid (or empty) masks give zeros.
    """
    b, q, h, w = masks.shape
    grid = coordinate_grid(h, w, device=masks.device, dtype=masks.dtype)
    mass = masks.sum(dim=(-2, -1))
    safe = mass.clamp_min(1e-8)
    cx = (masks * grid[0]).sum(dim=(-2, -1)) / safe
    cy = (masks * grid[1]).sum(dim=(-2, -1)) / safe
    dist2 = (grid[0] - cx[..., None, None]).pow(2) + (grid[1] - cy[..., None, None]).pow(2)
    msd = (masks * dist2).sum(dim=(-2, -1)) / safe
    size = (0.5 * msd).clamp_min(0.0).sqrt().clamp(MIN_MASK_SIZE, MAX_MASK_SIZE)
    position = torch.stack([cx, cy, size, torch.zeros_like(cx)], dim=-1)
    keep = valid.to(torch.bool) & (mass > 0)
    return position * keep.to(masks.dtype)[..., None]


def assign_to_free_slots(candidates_position: torch.Tensor, candidates_valid: torch.Tensor,
                         candidate_masks: torch.Tensor | None, free: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Give the j-th valid candidate to the j-th free slot (by index order), per row.

    Extra candidates (more than free slots) are dropped; extra free slots stay unassigned.

    Args:
        candidates_position: ``[B, Q, 4]``; candidates_valid: ``[B, Q]`` bool;
        candidate_masks: ``[B, Q, H, W]`` or None; free: ``[B, K]`` bool.

    Returns:
        ``position [B, K, 4]`` (zeros where not assigned), ``assigned [B, K]`` bool, and
        ``slot_masks [B, K, H, W]`` (zeros where not assigned) or None.
    """
    b, q, p = candidates_position.shape
    k = free.shape[1]
    free = free.to(torch.bool)
    valid = candidates_valid.to(torch.bool)
    if q == 0:
        assigned = torch.zeros(b, k, dtype=torch.bool, device=free.device)
        position = candidates_position.new_zeros(b, k, p)
        masks = None
        if candidate_masks is not None:
            masks = candidate_masks.new_zeros(b, k, *candidate_masks.shape[-2:])
        return position, assigned, masks
    # valid candidates first, in their original order (stable sort on 0 = valid / 1 = invalid)
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # [B, Q]
    num_valid = valid.sum(dim=1, keepdim=True)  # [B, 1]
    slot_rank = free.long().cumsum(dim=1) - 1  # rank of each free slot among free slots
    assigned = free & (slot_rank < num_valid)
    source = order.gather(1, slot_rank.clamp(0, q - 1))  # [B, K] candidate index per slot
    position = candidates_position.gather(1, source[..., None].expand(b, k, p))
    position = position * assigned.to(position.dtype)[..., None]
    masks = None
    if candidate_masks is not None:
        hh, ww = candidate_masks.shape[-2:]
        masks = candidate_masks.gather(1, source[..., None, None].expand(b, k, hh, ww))
        masks = masks * assigned.to(masks.dtype)[..., None, None]
    return position, assigned, masks


assign_proposals_to_free_slots = assign_to_free_slots
"""Name used in ``docs/architecture.md``; same function as :func:`assign_to_free_slots`."""


def unexplained_foreground(foreground: torch.Tensor, slot_masks: torch.Tensor,
                           presence: torch.Tensor) -> torch.Tensor:
    """Foreground not covered by present slots: ``fg * prod_k (1 - presence_k * mask_k)``.

    Args:
        foreground: ``[B, 1, H, W]`` in ``[0, 1]``; slot_masks: ``[B, K, H, W]`` in ``[0, 1]``;
        presence: ``[B, K]`` (bool or float in ``[0, 1]``).

    Returns:
        ``[B, H, W]`` in ``[0, 1]``.
    """
    weight = presence.to(slot_masks.dtype).clamp(0.0, 1.0)[..., None, None]
    uncovered = (1.0 - weight * slot_masks.clamp(0.0, 1.0)).prod(dim=1)
    return (foreground[:, 0] * uncovered).clamp(0.0, 1.0)
