"""Permutation-invariant encoder of a set of slots, shared by the SB3 and TorchRL policies.

Per slot ``[gestalt | position | depth]`` goes through one shared MLP; a learned query attends over
the present slots (multi-head attention pooling, absent slots masked out), and the pooled vector,
together with the fraction of present slots, is projected to ``features_dim``. Reordering the slots
never changes the output; a row where no slot is present gives a finite output (pooled part 0).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SlotSetEncoder", "unflatten_slots"]


def unflatten_slots(flat: torch.Tensor, num_slots: int) -> dict[str, torch.Tensor]:
    """Inverse of ``flatten_features``: ``[*, K*(G+6)]`` -> the four feature tensors."""
    per_slot = flat.shape[-1] // num_slots
    if per_slot * num_slots != flat.shape[-1] or per_slot < 7:
        raise ValueError(f"flat features: expected a size K*(G+6) with K={num_slots}, actual size: "
                         f"{flat.shape[-1]}")
    x = flat.reshape(*flat.shape[:-1], num_slots, per_slot)
    g = per_slot - 6
    return {"gestalt": x[..., :g], "position": x[..., g:g + 4], "depth": x[..., g + 4:g + 5],
            "presence": x[..., g + 5]}


class SlotSetEncoder(nn.Module):
    """Shared per-slot MLP + attention pooling with a learned query, masked by presence.

    Args:
        gestalt_dim: ``G``.
        features_dim: output size.
        hidden: width of the per-slot MLP and of the attention.
        heads: attention heads (``hidden`` must be divisible by it).
        presence_threshold: a slot counts as present when ``presence > presence_threshold``.

    Shapes: ``gestalt [*, K, G]``, ``position [*, K, 4]``, ``depth [*, K, 1]``, ``presence [*, K]``
    -> ``[*, features_dim]``.

    Example:
        >>> enc = SlotSetEncoder(96, features_dim=64)
        >>> enc(torch.rand(5, 6, 96), torch.rand(5, 6, 4), torch.rand(5, 6, 1), torch.ones(5, 6)).shape
        torch.Size([5, 64])
    """

    def __init__(self, gestalt_dim: int, features_dim: int = 128, hidden: int = 128, heads: int = 4,
                 presence_threshold: float = 0.5):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads, actual value: {heads}")
        self.gestalt_dim, self.hidden, self.heads = gestalt_dim, hidden, heads
        self.presence_threshold = presence_threshold
        self.slot_mlp = nn.Sequential(
            nn.Linear(gestalt_dim + 5, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.query = nn.Parameter(torch.randn(heads, hidden // heads) / math.sqrt(hidden // heads))
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.Linear(hidden + 1, features_dim), nn.ReLU())

    def forward(self, gestalt: torch.Tensor, position: torch.Tensor, depth: torch.Tensor,
                presence: torch.Tensor) -> torch.Tensor:
        x = torch.cat([gestalt, position, depth], -1).float()              # [*, K, G+5]
        h = self.slot_mlp(x)                                                  # [*, K, H]
        *batch, k, _ = h.shape
        d = self.hidden // self.heads
        keys = self.key(h).reshape(*batch, k, self.heads, d)
        values = self.value(h).reshape(*batch, k, self.heads, d)
        scores = (keys * self.query).sum(-1) / math.sqrt(d)                  # [*, K, heads]
        present = (presence.float() > self.presence_threshold)[..., None]     # [*, K, 1]
        # Absent slots get the lowest score; an all-absent row softmaxes uniformly and is then
        # zeroed by the mask (no -inf, hence no NaN).
        scores = scores.masked_fill(~present, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-2) * present                            # over slots
        pooled = (weights[..., None] * values).sum(-3).reshape(*batch, self.hidden)
        count = present.float().mean((-2, -1))[..., None]                     # [*, 1]
        return self.out(torch.cat([pooled, count], -1))
