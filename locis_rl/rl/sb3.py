"""Stable-Baselines3 adapters: :class:`LociSVecEnvWrapper` and :class:`SlotSetExtractor`.

Perception runs on the env side, batched across the envs of the ``VecEnv``, once per env step (never
again per PPO minibatch): the rollout buffer stores slot features, not pixels.

SB3 VecEnvs reset a finished env inside the same ``step`` and put its last observation in
``infos[i]["terminal_observation"]``. The wrapper therefore steps the model on the terminal frames
of the done rows (with their old state), converts ``terminal_observation`` into those features
(so bootstrapping on truncation sees features), then re-initialises exactly the done rows and steps
them on the first frame of their next episode.

Example:
    >>> from stable_baselines3 import PPO
    >>> from stable_baselines3.common.env_util import make_vec_env
    >>> venv = LociSVecEnvWrapper(make_vec_env("locis/PushObjects-v0", n_envs=2), model=LociS("tiny"))
    >>> model = PPO("MultiInputPolicy", venv, policy_kwargs=dict(
    ...     features_extractor_class=SlotSetExtractor, features_extractor_kwargs=dict(features_dim=64),
    ...     share_features_extractor=False))
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from .gymnasium_wrappers import image_source
from .perception import SlotPerception, flatten_features
from .slot_set import SlotSetEncoder, unflatten_slots

__all__ = ["LociSVecEnvWrapper", "SlotSetExtractor"]


class LociSVecEnvWrapper(VecEnvWrapper):
    """Recurrent Loci-s perception on an SB3 ``VecEnv`` (one batched model step per env step).

    Args:
        venv: a VecEnv with image observations (``Box`` uint8 ``(H, W, 3)``, or a ``Dict`` with
            ``rgb`` / ``pixels`` and optional ``depth``), or with ``render_mode="rgb_array"``
            (frames from ``get_images()``; then there is no terminal frame and
            ``terminal_observation`` is left as the raw observation).
        model, device, mode, flatten, rgb_key, depth_key, num_slots, model_overrides: as
            :class:`~locis_rl.rl.LociSWrapper` (the observation space has the effective ``K``).
        seed: base seed of the slot-state streams (row ``i`` uses ``seed + i``); :meth:`seed`
            sets it too, as it seeds the envs.
    """

    def __init__(self, venv: VecEnv, model: Any = "default", *, device: str = "auto",
                 mode: str | None = "seg", flatten: bool = False, rgb_key: str | None = None,
                 depth_key: str | None = "depth", seed: int | None = None, num_slots: int | None = None,
                 model_overrides: Mapping[str, Any] | None = None):
        self.perception = SlotPerception(model, num_envs=venv.num_envs, device=device, mode=mode,
                                         seed=seed, num_slots=num_slots, model_overrides=model_overrides)
        render_mode = getattr(venv, "render_mode", None)
        self.source = image_source(venv.observation_space, render_mode, rgb_key, depth_key,
                                   self.perception.use_depth, what="VecEnv")
        self.flatten = bool(flatten)
        self.num_slots = self.perception.num_slots
        self.gestalt_dim = self.perception.gestalt_dim
        super().__init__(venv, observation_space=self.perception.features_space(flatten=self.flatten))
        self._pending_seed: int | None = None

    def seed(self, seed: int | None = None):
        seeds = self.venv.seed(seed)
        self._pending_seed = seeds[0] if seeds and seeds[0] is not None else seed
        return seeds

    def _frames(self, obs: Any) -> tuple[np.ndarray, np.ndarray | None]:
        kind, rgb_key, depth_key = self.source
        if kind == "obs":
            return np.asarray(obs), None
        if kind == "dict":
            return np.asarray(obs[rgb_key]), None if depth_key is None else np.asarray(obs[depth_key])
        return np.stack([np.asarray(f) for f in self.venv.get_images()]), None

    def _out(self, features: dict[str, np.ndarray]) -> Any:
        return flatten_features(features) if self.flatten else features

    def reset(self):
        obs = self.venv.reset()
        rgb, depth = self._frames(obs)
        seed, self._pending_seed = self._pending_seed, None
        return self._out(self.perception.reset(rgb, depth, seed=seed))

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        rgb, depth = self._frames(obs)
        dones = np.asarray(dones, dtype=np.bool_)
        if not dones.any():
            return self._out(self.perception.step(rgb, depth)), rewards, dones, infos
        if self.source[0] == "render":
            features = self.perception.step(rgb, depth, reset_mask=dones)
            return self._out(features), rewards, dones, infos
        # Terminal frames of the done rows with their old state ...
        rgb_in = rgb.copy()
        depth_in = None if depth is None else depth.copy()
        kind, rgb_key, depth_key = self.source
        for i in np.flatnonzero(dones):
            terminal = infos[i]["terminal_observation"]
            rgb_in[i] = terminal if kind == "obs" else terminal[rgb_key]
            if depth_in is not None:
                depth_in[i] = terminal[depth_key]
        final = self.perception.step(rgb_in, depth_in)
        for i in np.flatnonzero(dones):
            row = {k: v[i] for k, v in final.items()}
            infos[i]["terminal_observation"] = self._out(row)
        # ... then a new state for exactly those rows, on their first frame.
        features = self.perception.reset(rgb, depth, mask=dones)
        return self._out(features), rewards, dones, infos

    def render(self, mode: str | None = None) -> np.ndarray | None:
        """A tiled uint8 image of every env's model input with slot masks and positions drawn."""
        frames = self.perception.render()
        return np.concatenate(list(frames), axis=1)

    def get_images(self):
        return list(self.perception.render())


class SlotSetExtractor(BaseFeaturesExtractor):
    """Permutation-invariant features extractor over the slots (:class:`SlotSetEncoder`).

    Learned queries pick slots by their Gestalt code (attention over the present slots); the picked
    slots' positions, depths, embeddings and the differences of their positions and depths are the
    features (an all-absent row gives finite features). Pass ``share_features_extractor=False`` in
    PPO's ``policy_kwargs`` (as :mod:`locis_rl.rl.compare` and the examples do): actor and critic
    then have their own encoder, and the value loss does not shape the policy's features.

    Args:
        observation_space: the ``Dict`` of :class:`LociSWrapper` / :class:`LociSVecEnvWrapper`
            (keys ``gestalt``, ``position``, ``depth``, ``presence``), or their flat ``Box`` when
            ``num_slots`` is given (pass ``num_slots=env.num_slots``: the Box alone cannot tell K).
        features_dim: output size; hidden: width of the key and embedding MLPs; queries: number
            of learned queries (objects the policy can single out).
    """

    def __init__(self, observation_space: gym.Space, features_dim: int = 128, hidden: int = 64,
                 num_slots: int | None = None, queries: int = 4):
        super().__init__(observation_space, features_dim)
        if isinstance(observation_space, gym.spaces.Dict):
            missing = {"gestalt", "position", "depth", "presence"} - set(observation_space.spaces)
            if missing:
                raise ValueError(f"observation_space: expected the slot features Dict of LociSWrapper, "
                                 f"missing keys {sorted(missing)}; actual value: {observation_space}")
            gestalt_dim = observation_space["gestalt"].shape[-1]
            self.num_slots = None
        elif isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1:
            if num_slots is None:
                raise ValueError("a flat Box observation needs num_slots=... (e.g. "
                                 "num_slots=env.num_slots of LociSWrapper(flatten=True)), or use "
                                 "flatten=False and the Dict observation")
            gestalt_dim = observation_space.shape[0] // num_slots - 6
            if gestalt_dim < 1 or (gestalt_dim + 6) * num_slots != observation_space.shape[0]:
                raise ValueError(f"flat Box of size {observation_space.shape[0]} is not K*(G+6) with "
                                 f"K={num_slots}")
            self.num_slots = int(num_slots)
        else:
            raise TypeError(f"observation_space: expected the Dict (or flat Box) of LociSWrapper, "
                            f"actual value: {observation_space}")
        self.encoder = SlotSetEncoder(gestalt_dim, features_dim=features_dim, hidden=hidden,
                                      queries=queries)

    def forward(self, observations: Any) -> torch.Tensor:
        if self.num_slots is not None:
            observations = unflatten_slots(observations, self.num_slots)
        return self.encoder(observations["gestalt"], observations["position"], observations["depth"],
                            observations["presence"])
