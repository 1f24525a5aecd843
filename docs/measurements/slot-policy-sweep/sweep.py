"""Variants of the slot-set encoder on oracle slots, through ``compare --inputs oracle_slots`` (exploratory).

Usage (repository root): ``OMP_NUM_THREADS=1 python docs/measurements/slot-policy-sweep/sweep.py VARIANT SEED [STEPS]``
writes ``/root/sweep/VARIANT/`` (the compare output folder: results.json, curves).
Each variant replaces ``locis_rl.rl.sb3.SlotSetEncoder`` for the run; PPO settings are compare's.
"""
import sys

import torch
from torch import nn

import locis_rl.rl.sb3 as sb3
from locis_rl.rl import compare
from locis_rl.rl.slot_set import SlotSetEncoder  # the "select" variant of this sweep, now the library's


# The slot-set encoder of locis_rl before this sweep (commit 89312a6), the baseline.
class PairEncoder(nn.Module):
    """Shared per-slot MLP, pair tokens with relative position / depth, masked mean + max pooling.

    Args:
        gestalt_dim: ``G``.
        features_dim: output size.
        hidden: width of the per-slot and pair MLPs.
        presence_threshold: a slot counts as present when ``presence > presence_threshold``.

    Shapes: ``gestalt [*, K, G]``, ``position [*, K, 4]``, ``depth [*, K, 1]``, ``presence [*, K]``
    -> ``[*, features_dim]``. Cost grows with ``K^2`` (64 pair tokens of width ``hidden`` for 8 slots).

    Example:
        >>> enc = PairEncoder(96, features_dim=64)
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


class RelativeScaled(PairEncoder):
    """Pair inputs [dx, dy, dd, |dp|] times ``scale``: fine relative offsets get larger pre-activations."""

    scale = 4.0

    def __init__(self, gestalt_dim, features_dim=128, hidden=64, presence_threshold=0.5):
        super().__init__(gestalt_dim, features_dim, hidden, presence_threshold)
        self.pair_relative = nn.Linear(4, hidden, bias=False)

    def forward(self, gestalt, position, depth, presence):
        position, depth = position.float(), depth.float()
        e = self.slot_mlp(torch.cat([gestalt.float(), position, depth], -1))
        dp = position[..., None, :, :2] - position[..., :, None, :2]
        dd = depth[..., None, :, :] - depth[..., :, None, :]
        relative = self.scale * torch.cat([dp, dd, dp.norm(dim=-1, keepdim=True)], -1)
        tokens = self.pair_mlp(self.pair_first(e)[..., :, None, :] + self.pair_second(e)[..., None, :, :]
                               + self.pair_relative(relative))
        present = presence.float() > self.presence_threshold
        pair = (present[..., :, None] & present[..., None, :]).flatten(-2)[..., None].float()
        tokens = tokens.flatten(-3, -2) * pair
        mean = tokens.sum(-2) / pair.sum(-2).clamp_min(1.0)
        return self.out(torch.cat([mean, tokens.amax(-2), present.float().mean(-1, keepdim=True)], -1))


class NodeUpdate(PairEncoder):
    """One message-passing step: each slot max-pools its outgoing pair tokens, an MLP updates the
    slot from [own embedding | messages], then mean + max over slots. The target's slot then holds
    both relations the push needs (pusher - target, goal - target) in one vector."""

    def __init__(self, gestalt_dim, features_dim=128, hidden=64, presence_threshold=0.5):
        super().__init__(gestalt_dim, features_dim, hidden, presence_threshold)
        self.node = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, gestalt, position, depth, presence):
        position, depth = position.float(), depth.float()
        e = self.slot_mlp(torch.cat([gestalt.float(), position, depth], -1))
        relative = torch.cat([position[..., None, :, :2] - position[..., :, None, :2],
                              depth[..., None, :, :] - depth[..., :, None, :]], -1)
        tokens = self.pair_mlp(self.pair_first(e)[..., :, None, :] + self.pair_second(e)[..., None, :, :]
                               + self.pair_relative(relative))                      # [*, K, K, H]
        present = presence.float() > self.presence_threshold
        pair = (present[..., :, None] & present[..., None, :])[..., None].float()  # [*, K, K, 1]
        tokens = tokens * pair
        msg_max = tokens.amax(-2)
        msg_mean = tokens.sum(-2) / pair.sum(-2).clamp_min(1.0)
        h = self.node(torch.cat([e, msg_mean, msg_max], -1)) * present[..., None].float()  # [*, K, H]
        mean = h.sum(-2) / present.float().sum(-1, keepdim=True).clamp_min(1.0)
        return self.out(torch.cat([mean, h.amax(-2), present.float().mean(-1, keepdim=True)], -1))


class Wide(PairEncoder):
    def __init__(self, gestalt_dim, features_dim=128, hidden=64, presence_threshold=0.5):
        super().__init__(gestalt_dim, features_dim, 128, presence_threshold)


VARIANTS = {"base": PairEncoder, "relscaled": RelativeScaled, "node": NodeUpdate, "wide": Wide, "select": SlotSetEncoder}

if __name__ == "__main__":
    variant, seed = sys.argv[1], sys.argv[2]
    steps = sys.argv[3] if len(sys.argv) > 3 else "250000"
    sb3.SlotSetEncoder = VARIANTS[variant]
    compare.main(["--inputs", "oracle_slots", "--seeds", seed, "--timesteps", steps, "--num-envs", "8",
                  "--num-slots", "8", "--eval-distractors", "3", "--device", "cpu",
                  "--out", f"/root/sweep/{variant}_s{seed}"])
