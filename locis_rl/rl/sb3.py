"""Stable-Baselines3 adapters: :class:`LociSVecEnvWrapper`, :class:`ControlledSlotVecEnv` and :class:`SlotSetExtractor`.

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
from tensordict import TensorDict

from .controlled_slot import ControlledSlotConfig, ControlledSlotTracker, action_feature_dim, action_features
from .gymnasium_wrappers import image_source
from .perception import SlotPerception, flatten_features
from .slot_set import SlotSetEncoder, unflatten_slots

__all__ = ["LociSVecEnvWrapper", "ControlledSlotVecEnv", "SlotSetExtractor"]


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


class ControlledSlotVecEnv(VecEnvWrapper):
    """Adds ``controlled [K]`` (1 on the slot the agent's actions move best, else 0) to slot features.

    Args:
        venv: an SB3 ``VecEnv`` whose observations are the slot-feature ``Dict`` (``position
            [K, 4]``, ``presence [K]``, ...) of :class:`~locis_rl.rl.LociSVecEnvWrapper` with
            ``flatten=False``, or of the oracle slots of :mod:`locis_rl.rl.compare`.
        config: the tracker's settings (:class:`~locis_rl.rl.controlled_slot.ControlledSlotConfig`).
        output: ``"controlled"`` (the 0 / 1 mark) or ``"explained"`` (every slot's R^2 itself).

    The first frame of an episode has no mark (no action yet). Episodes that end are handled as SB3
    auto-resets them: the terminal observation (when it holds slot features) gets the finished
    episode's mark, and the row starts afresh on the first frame of its next episode.
    """

    def __init__(self, venv: VecEnv, config: ControlledSlotConfig | None = None, output: str = "controlled"):
        space = venv.observation_space
        if not isinstance(space, gym.spaces.Dict) or not {"position", "presence"} <= set(space.spaces):
            raise ValueError(f"ControlledSlotVecEnv: expected the slot-feature Dict observations of "
                             f"LociSVecEnvWrapper (flatten=False), with keys 'position' and 'presence'; "
                             f"actual space: {space}")
        if "controlled" in space.spaces:
            raise ValueError("ControlledSlotVecEnv: the observations already have a 'controlled' key "
                             "(wrapped twice?)")
        if output not in ("controlled", "explained"):
            raise ValueError(f"output: expected 'controlled' or 'explained', actual value: {output!r}")
        self.num_slots = space["presence"].shape[0]
        self.output = output
        self.action_dim = action_feature_dim(venv.action_space)   # no sample(): it would draw from the space's RNG
        spaces = dict(space.spaces)
        spaces["controlled"] = gym.spaces.Box(0.0, 1.0, (self.num_slots,), np.float32)
        super().__init__(venv, observation_space=gym.spaces.Dict(spaces))
        self.tracker = ControlledSlotTracker(config)
        self.state: TensorDict | None = None
        self._actions: np.ndarray | None = None

    @staticmethod
    def _xy(obs) -> torch.Tensor:
        return torch.as_tensor(np.asarray(obs["position"])[..., :2])

    def _with(self, obs: dict, cue: np.ndarray) -> dict:
        out = dict(obs)
        out["controlled"] = cue.astype(np.float32)
        return out

    def reset(self):
        obs = self.venv.reset()
        self.state = self.tracker.initial_state(self._xy(obs), self.action_dim)
        return self._with(obs, np.zeros((self.num_envs, self.num_slots)))

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)
        self.venv.step_async(actions)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        if self.state is None or self._actions is None:
            raise RuntimeError("ControlledSlotVecEnv: step() before reset()")
        dones = np.asarray(dones, dtype=np.bool_)
        obs_xy = self._xy(obs)                                                         # [N, K, 2]
        xy, presence = obs_xy.clone(), torch.as_tensor(np.asarray(obs["presence"])).clone()
        terminal_rows = [i for i in np.flatnonzero(dones)
                         if isinstance(infos[i].get("terminal_observation"), dict)
                         and "position" in infos[i]["terminal_observation"]]
        for i in terminal_rows:        # a done row's action led to its terminal frame, not to obs
            xy[i] = self._xy(infos[i]["terminal_observation"])
            presence[i] = torch.as_tensor(np.asarray(infos[i]["terminal_observation"]["presence"]))
        action = torch.as_tensor(action_features(self.action_space, self._actions))
        explained, controlled, self.state = self.tracker.step(self.state, action, xy, presence)
        cue = (controlled if self.output == "controlled" else explained).numpy()
        for i in terminal_rows:
            infos[i]["terminal_observation"] = self._with(infos[i]["terminal_observation"], cue[i])
        if dones.any():
            self.state = self.tracker.reset_rows(self.state, torch.as_tensor(dones), obs_xy)
            cue = np.where(dones[:, None], 0.0, cue)
        return self._with(obs, cue), rewards, dones, infos


class SlotSetExtractor(BaseFeaturesExtractor):
    """Permutation-invariant features extractor over the slots (:class:`SlotSetEncoder`).

    Learned queries pick slots by their Gestalt code (attention over the present slots); the picked
    slots' positions, depths, embeddings and the differences of their positions and depths are the
    features (an all-absent row gives finite features). Pass ``share_features_extractor=False`` in
    PPO's ``policy_kwargs`` (as :mod:`locis_rl.rl.compare` and the examples do): actor and critic
    then have their own encoder, and the value loss does not shape the policy's features.

    Args:
        observation_space: the ``Dict`` of :class:`LociSWrapper` / :class:`LociSVecEnvWrapper`
            (keys ``gestalt``, ``position``, ``depth``, ``presence``, and ``controlled`` when
            :class:`ControlledSlotVecEnv` added it: then it is one more Gestalt channel), or their
            flat ``Box`` when ``num_slots`` is given (pass ``num_slots=env.num_slots``: the Box alone
            cannot tell K).
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
            # ControlledSlotVecEnv's cue goes in as one more Gestalt channel, so the content keys
            # can pick the slot the agent moves whatever its Gestalt code says
            self.with_controlled = "controlled" in observation_space.spaces
            gestalt_dim += self.with_controlled
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
            self.with_controlled = False
        else:
            raise TypeError(f"observation_space: expected the Dict (or flat Box) of LociSWrapper, "
                            f"actual value: {observation_space}")
        self.encoder = SlotSetEncoder(gestalt_dim, features_dim=features_dim, hidden=hidden,
                                      queries=queries)

    def forward(self, observations: Any) -> torch.Tensor:
        if self.num_slots is not None:
            observations = unflatten_slots(observations, self.num_slots)
        gestalt = observations["gestalt"]
        if self.with_controlled:
            gestalt = torch.cat([gestalt.float(), observations["controlled"].float()[..., None]], -1)
        return self.encoder(gestalt, observations["position"], observations["depth"], observations["presence"])
