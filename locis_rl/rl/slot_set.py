"""Permutation-invariant encoder of a set of slots, shared by the SB3 and TorchRL policies.

``Q`` learned queries each pick slots by their content: a softmax over the present slots of
``query . key(gestalt)``, with keys computed from the Gestalt code alone, so a query learns to find
"the dark object" wherever it is. For every query the encoder reads the picked slots' position
``(x, y)`` and depth, an embedding of the picked slots (a per-slot MLP of
``[gestalt | position | depth]``), and the differences of the picked positions and depths between
every two queries. These, with the fraction of present slots, go through a linear layer + ReLU to
``features_dim``. Reordering the slots never changes the output; absent slots get zero weight, and
a row where no slot is present gives a finite output (picked parts 0).

Why this shape: tasks such as pushing turn on relations between particular objects
(target - effector, goal - target). PPO learns them quickly from a fixed-order state vector with
those differences as inputs, and slowly or not at all when it must form them itself from pooled
slot embeddings. Picking slots by content and handing over the differences of what was picked gives
the policy that state-vector shape from an unordered set. On ground-truth slots of PushObjects
(``oracle_slots`` in :mod:`locis_rl.rl.compare`) this learned within 250k steps where attention
pooling of embeddings (one learned query) and pair tokens with mean/max pooling did not
(docs/results.md, "RL").
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
    """Content-addressed picking of slots by ``queries`` learned queries, then their geometry and relations.

    Args:
        gestalt_dim: ``G``.
        features_dim: output size.
        hidden: width of the key and embedding MLPs.
        queries: number of learned queries ``Q`` (objects the policy can single out; PushObjects
            needs three: pusher, target, goal).
        presence_threshold: a slot counts as present when ``presence > presence_threshold``.

    Shapes: ``gestalt [*, K, G]``, ``position [*, K, 4]``, ``depth [*, K, 1]``, ``presence [*, K]``
    -> ``[*, features_dim]``. Cost grows with ``K * Q``.

    Example:
        >>> enc = SlotSetEncoder(96, features_dim=64)
        >>> enc(torch.rand(5, 6, 96), torch.rand(5, 6, 4), torch.rand(5, 6, 1), torch.ones(5, 6)).shape
        torch.Size([5, 64])
    """

    def __init__(self, gestalt_dim: int, features_dim: int = 128, hidden: int = 64, queries: int = 4,
                 presence_threshold: float = 0.5):
        super().__init__()
        if queries < 1:
            raise ValueError(f"queries: expected >= 1, actual value: {queries}")
        self.gestalt_dim, self.hidden, self.queries = gestalt_dim, hidden, queries
        self.presence_threshold = presence_threshold
        self.key = nn.Sequential(nn.Linear(gestalt_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.query = nn.Parameter(torch.randn(queries, hidden))
        self.embed = nn.Sequential(nn.Linear(gestalt_dim + 5, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.register_buffer("upper", torch.triu(torch.ones(queries, queries, dtype=torch.bool), 1),
                             persistent=False)
        relations = queries * (queries - 1) // 2
        self.out = nn.Sequential(nn.Linear(queries * (hidden + 3) + 3 * relations + 1, features_dim), nn.ReLU())

    def forward(self, gestalt: torch.Tensor, position: torch.Tensor, depth: torch.Tensor,
                presence: torch.Tensor) -> torch.Tensor:
        gestalt, position, depth = gestalt.float(), position.float(), depth.float()
        present = presence.float() > self.presence_threshold                           # [*, K]
        logits = torch.einsum("qh,...kh->...qk", self.query, self.key(gestalt)) / self.hidden ** 0.5
        # A finite mask value (not -inf) keeps a row without present slots free of NaN, in the
        # forward and the backward pass; that row then picks nothing.
        weight = logits.masked_fill(~present[..., None, :], -1e9).softmax(-1)           # [*, Q, K]
        weight = weight * present.any(-1)[..., None, None].float()
        geometry = torch.cat([position[..., :2], depth], -1)                          # [*, K, 3]
        picked = weight @ geometry                                                     # [*, Q, 3]
        embedding = weight @ self.embed(torch.cat([gestalt, position, depth], -1))     # [*, Q, H]
        relations = (picked[..., None, :, :] - picked[..., :, None, :])[..., self.upper, :]  # [*, Q(Q-1)/2, 3]
        count = present.float().mean(-1, keepdim=True)                                 # [*, 1]
        return self.out(torch.cat([embedding.flatten(-2), picked.flatten(-2), relations.flatten(-2), count], -1))
