"""Which slot does the agent move? A per-slot cue computed from slot positions and the agent's actions.

Loci-s's Gestalt codes do not always tell the agent's own body apart from other objects in unseen
scenes (on PushObjects a linear read-out takes the pusher's slot for a distractor in 28 % of
frames, whole episodes at a time), and a policy that picks slots by content then cannot find what
it moves (docs/results.md, "Perfect slots made imperfect"). What it moves is also what moves when
it acts. Per env and slot this module fits, by least squares on exponentially weighted sums through
the episode so far, a linear map from the previous action to the slot's (x, y) displacement, and
reads how much of the displacement that map explains (an R^2 in [0, 1]). Through a linear map any
camera's image axes fit as well as the table's, so image-space slot positions serve. The slot with
the best explained motion is marked ``controlled`` (1, the others 0), once it is explained well
enough: a pushed object follows the actions too (R^2 ~0.5 while pushed on PushObjects, against the
pusher's ~0.76), but the pusher is the best explained slot in 99.7 % of frames.

State is data (a TensorDict, batch ``[N]``) passed in and returned, so rows are independent and a
reset of some rows leaves the others exact. :class:`~locis_rl.rl.sb3.ControlledSlotVecEnv` puts the cue into the
observations of an SB3 slot-feature ``VecEnv`` (:class:`~locis_rl.rl.LociSVecEnvWrapper` and the
oracle slots of :mod:`locis_rl.rl.compare`); :class:`~locis_rl.rl.SlotSetExtractor` then lets its
content keys see it.
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict

__all__ = ["ControlledSlotConfig", "ControlledSlotTracker", "action_features", "action_feature_dim"]


@dataclass(frozen=True)
class ControlledSlotConfig:
    """Settings of :class:`ControlledSlotTracker`.

    Args:
        decay: weight kept per frame by the sums (0.9: half-life ~7 frames).
        ridge: added to the action covariance before it is inverted (keeps the first frames'
            rank-deficient fits finite).
        rest_motion: per-frame displacement (slot position units) below which a slot reads as at
            rest: a floor of ``rest_motion^2 / (1 - decay)`` on the motion sum, so a still slot gets
            R^2 ~0 rather than 0 / 0.
        min_explained: no slot is marked ``controlled`` until the best one's R^2 exceeds this.
    """

    decay: float = 0.9
    ridge: float = 0.05
    rest_motion: float = 0.005
    min_explained: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), actual value: {self.decay}")
        if self.ridge <= 0 or self.rest_motion <= 0:
            raise ValueError(f"ridge and rest_motion: expected positive values, actual values: "
                             f"{self.ridge}, {self.rest_motion}")
        if not 0.0 <= self.min_explained < 1.0:
            raise ValueError(f"min_explained: expected a value in [0, 1), actual value: {self.min_explained}")


class ControlledSlotTracker:
    """Action-explained slot motion, per env and slot, vectorised over both.

    Shapes: ``xy [N, K, 2]`` (slot positions), ``action [N, A]`` (the action taken since the frame
    before, as floats: see :func:`action_features`), ``presence [N, K]``, ``rows [N]`` bool.

    Example:
        >>> tracker = ControlledSlotTracker()
        >>> state = tracker.initial_state(torch.zeros(2, 5, 2), action_dim=2)
        >>> explained, controlled, state = tracker.step(state, torch.ones(2, 2), torch.rand(2, 5, 2),
        ...                                             torch.ones(2, 5))
        >>> explained.shape, controlled.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """

    def __init__(self, config: ControlledSlotConfig | None = None):
        self.config = config or ControlledSlotConfig()

    def initial_state(self, xy: torch.Tensor, action_dim: int) -> TensorDict:
        """The state at the first frame of an episode, whose slot positions are ``xy [N, K, 2]``."""
        n, k = xy.shape[:2]
        kw = dict(dtype=torch.float64, device=xy.device)
        return TensorDict({"sum_aa": torch.zeros(n, action_dim, action_dim, **kw),
                           "sum_da": torch.zeros(n, k, 2, action_dim, **kw),
                           "sum_dd": torch.zeros(n, k, **kw),
                           "xy": xy.to(torch.float64)}, batch_size=[n], device=xy.device)

    def reset_rows(self, state: TensorDict, rows: torch.Tensor, xy: torch.Tensor) -> TensorDict:
        """``state`` with the rows flagged in ``rows [N]`` started afresh at positions ``xy [N, K, 2]``."""
        fresh = self.initial_state(xy, state["sum_aa"].shape[-1])
        return TensorDict({key: torch.where(rows.view(-1, *[1] * (value.ndim - 1)), fresh[key], value)
                           for key, value in state.items()}, batch_size=state.batch_size, device=state.device)

    def step(self, state: TensorDict, action: torch.Tensor, xy: torch.Tensor, presence: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, TensorDict]:
        """One frame: -> ``explained [N, K]`` (R^2 in [0, 1]), ``controlled [N, K]`` (0 / 1), new state."""
        c = self.config
        a = action.to(torch.float64).reshape(action.shape[0], -1)                     # [N, A]
        xy = xy.to(torch.float64)
        d = xy - state["xy"]                                                           # [N, K, 2]
        sum_aa = c.decay * state["sum_aa"] + a[:, :, None] * a[:, None, :]
        sum_da = c.decay * state["sum_da"] + d[..., :, None] * a[:, None, None, :]
        sum_dd = c.decay * state["sum_dd"] + (d ** 2).sum(-1)
        eye = torch.eye(a.shape[1], dtype=torch.float64, device=a.device)
        inverse = torch.linalg.inv(sum_aa + c.ridge * eye)                             # [N, A, A]
        fitted = torch.einsum("nkij,njl,nkil->nk", sum_da, inverse, sum_da)          # |fit|^2 summed
        floor = c.rest_motion ** 2 / (1.0 - c.decay)
        explained = (fitted / (sum_dd + floor)).clamp(0.0, 1.0)
        score = torch.where(presence > 0.5, explained, torch.full_like(explained, -1.0))
        best = score.max(1, keepdim=True)
        controlled = (torch.arange(score.shape[1], device=score.device) == best.indices) & (
            best.values > c.min_explained)
        new_state = TensorDict({"sum_aa": sum_aa, "sum_da": sum_da, "sum_dd": sum_dd, "xy": xy},
                               batch_size=state.batch_size, device=state.device)
        return explained.float(), controlled.float(), new_state


ACTION_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


def action_feature_dim(action_space: gym.Space) -> int:
    """``A`` of :func:`action_features` for ``action_space`` (its flat size; a clear error for others)."""
    if not isinstance(action_space, ACTION_SPACES):
        raise TypeError(f"action space: expected Box, Discrete, MultiDiscrete or MultiBinary, actual value: "
                        f"{action_space}")
    return gym.spaces.flatdim(action_space)


def action_features(action_space: gym.Space, actions: np.ndarray) -> np.ndarray:
    """Batched actions ``[N, ...]`` of ``action_space`` -> floats ``[N, A]`` for the least-squares fit.

    ``Box``: flattened; ``Discrete``: one-hot; ``MultiDiscrete``: the one-hots side by side;
    ``MultiBinary``: as floats (the encodings of ``gymnasium.spaces.flatten``, for a batch at once).
    """
    action_feature_dim(action_space)
    actions = np.asarray(actions)
    n = actions.shape[0] if actions.ndim else 1
    if isinstance(action_space, gym.spaces.Discrete):
        return np.eye(int(action_space.n))[actions.reshape(n).astype(np.int64) - int(action_space.start)]
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        nvec, start = action_space.nvec.reshape(-1), np.asarray(action_space.start).reshape(-1)
        flat = actions.reshape(n, -1).astype(np.int64) - start
        return np.concatenate([np.eye(int(m))[flat[:, i]] for i, m in enumerate(nvec)], 1)
    return actions.reshape(n, -1).astype(np.float64)       # Box, MultiBinary
