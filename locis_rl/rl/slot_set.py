"""Permutation-invariant, relational encoder of a set of slots, shared by the SB3 and TorchRL policies.

Every ordered pair of slots ``(i, j)``, ``i == j`` included, becomes a token: an MLP over the two
slots' embeddings (a shared per-slot MLP of ``[gestalt | position | depth]``) and their relative
position ``p_j - p_i`` (x, y) and depth ``d_j - d_i``. Tokens of pairs whose slots are both present
are pooled by a masked mean and a masked max; with the fraction of present slots they are projected
to ``features_dim``. Reordering the slots never changes the output; a row where no slot is present
gives a finite output (pooled part 0).

Why pairs: tasks such as pushing turn on relations between objects (target - effector,
goal - target). A PPO policy that had to find the right two slots by learned attention and subtract
their positions itself did not learn them in 250k steps even from perfect slots (ground-truth
positions, ``oracle_slots`` in :mod:`locis_rl.rl.compare`); the relative positions as explicit pair
inputs did (docs/results.md, "RL").
"""
from __future__ import annotations

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
    """Shared per-slot MLP, pair tokens with relative position / depth, masked mean + max pooling.

    Args:
        gestalt_dim: ``G``.
        features_dim: output size.
        hidden: width of the per-slot and pair MLPs.
        presence_threshold: a slot counts as present when ``presence > presence_threshold``.

    Shapes: ``gestalt [*, K, G]``, ``position [*, K, 4]``, ``depth [*, K, 1]``, ``presence [*, K]``
    -> ``[*, features_dim]``. Cost grows with ``K^2`` (64 pair tokens of width ``hidden`` for 8 slots).

    Example:
        >>> enc = SlotSetEncoder(96, features_dim=64)
        >>> enc(torch.rand(5, 6, 96), torch.rand(5, 6, 4), torch.rand(5, 6, 1), torch.ones(5, 6)).shape
        torch.Size([5, 64])
    """

    def __init__(self, gestalt_dim: int, features_dim: int = 128, hidden: int = 64,
                 presence_threshold: float = 0.5):
        super().__init__()
        self.gestalt_dim, self.hidden = gestalt_dim, hidden
        self.presence_threshold = presence_threshold
        self.slot_mlp = nn.Sequential(
            nn.Linear(gestalt_dim + 5, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden),
        )
        # The pair MLP's first layer on [e_i | e_j | dp | dd], split by input so that it runs on
        # K slots (not K^2 pairs) before the broadcast sum.
        self.pair_first = nn.Linear(hidden, hidden)
        self.pair_second = nn.Linear(hidden, hidden, bias=False)
        self.pair_relative = nn.Linear(3, hidden, bias=False)
        self.pair_mlp = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(2 * hidden + 1, features_dim), nn.ReLU())

    def forward(self, gestalt: torch.Tensor, position: torch.Tensor, depth: torch.Tensor,
                presence: torch.Tensor) -> torch.Tensor:
        position, depth = position.float(), depth.float()
        e = self.slot_mlp(torch.cat([gestalt.float(), position, depth], -1))         # [*, K, H]
        relative = torch.cat([position[..., None, :, :2] - position[..., :, None, :2],
                              depth[..., None, :, :] - depth[..., :, None, :]], -1)  # [*, K, K, 3]
        tokens = self.pair_mlp(self.pair_first(e)[..., :, None, :] + self.pair_second(e)[..., None, :, :]
                               + self.pair_relative(relative))                      # [*, K, K, H]
        present = presence.float() > self.presence_threshold                         # [*, K]
        pair = (present[..., :, None] & present[..., None, :]).flatten(-2)[..., None].float()
        tokens = tokens.flatten(-3, -2) * pair                                        # [*, K*K, H]
        mean = tokens.sum(-2) / pair.sum(-2).clamp_min(1.0)
        # Tokens are >= 0 (ReLU), so the zeroed absent pairs never win the max.
        largest = tokens.amax(-2)
        count = present.float().mean(-1, keepdim=True)                               # [*, 1]
        return self.out(torch.cat([mean, largest, count], -1))
