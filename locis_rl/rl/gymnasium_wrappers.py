"""Gymnasium adapters: :class:`LociSWrapper` (one env) and :class:`LociSVectorWrapper` (vector envs).

Both replace image observations by Loci-s slot features (see :mod:`locis_rl.rl.perception` for the
feature layout, preprocessing and seeding). They are recurrent: ``reset`` starts a new slot state
(the model's warm-up happens inside its first step), ``step`` advances it by one frame.

Where the frames come from, in order:
  1. the observation, if it is an image (``Box`` uint8 ``(H, W, 3)``);
  2. ``obs[rgb_key]`` of a ``Dict`` observation (``rgb_key=None`` tries ``"rgb"`` then ``"pixels"``),
     with metric depth from ``obs[depth_key]`` when present;
  3. ``env.render()`` for envs whose observation is not an image, which needs
     ``render_mode="rgb_array"``.
Frames of another size than the model's ``image_size`` are resized on the model's device
(bilinear, anti-aliased; depth nearest-neighbour).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

from .perception import SlotPerception, flatten_features

__all__ = ["LociSWrapper", "LociSVectorWrapper", "image_source"]

_RGB_KEYS = ("rgb", "pixels")


def _is_image_box(space: gym.Space) -> bool:
    """A ``Box (H, W, C)``: uint8, or floating point with 3 channels (first or last axis)."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 3:
        return False
    if space.dtype == np.uint8:
        return True
    return np.issubdtype(space.dtype, np.floating) and 3 in (space.shape[0], space.shape[-1])


def image_source(observation_space: gym.Space, render_mode: str | None, rgb_key: str | None = None,
                 depth_key: str | None = "depth", use_depth: bool = False, what: str = "env"
                 ) -> tuple[str, str | None, str | None]:
    """Decide where the frames come from: ``("obs" | "dict" | "render", rgb_key, depth_key)``.

    Raises:
        ValueError: no image can be had (the message says how to provide one), the image does not
            have 3 channels, or the model needs depth that the env does not provide.
    """
    source: tuple[str, str | None, str | None] | None = None
    if rgb_key is None and _is_image_box(observation_space):
        source = ("obs", None, None)
    elif isinstance(observation_space, gym.spaces.Dict):
        keys = (rgb_key,) if rgb_key is not None else _RGB_KEYS
        found = next((k for k in keys if k in observation_space.spaces), None)
        if found is not None:
            sub = observation_space.spaces[found]
            if not isinstance(sub, gym.spaces.Box) or len(sub.shape) != 3:
                raise ValueError(f"observation[{found!r}]: expected an image Box (H, W, 3), actual "
                                 f"value: {sub}")
            dk = depth_key if depth_key is not None and depth_key in observation_space.spaces else None
            source = ("dict", found, dk)
        elif rgb_key is not None:
            raise ValueError(f"rgb_key={rgb_key!r} is not a key of the observation space; keys: "
                             f"{list(observation_space.spaces)}")
    if source is None:
        if render_mode != "rgb_array":
            raise ValueError(
                f"LociS needs images, but the {what}'s observation space {observation_space} is not an "
                "image (uint8 Box (H, W, 3), or a Dict with an 'rgb' / 'pixels' key) and its "
                f"render_mode is {render_mode!r}. Create the env with render_mode='rgb_array' "
                "(e.g. gymnasium.make(env_id, render_mode='rgb_array')) so that frames come from "
                "env.render(), or give it an image observation.")
        source = ("render", None, None)
    if source[0] != "render":
        space = observation_space if source[0] == "obs" else observation_space.spaces[source[1]]
        channels = space.shape[-1] if space.shape[-1] <= 4 or space.dtype == np.uint8 else space.shape[0]
        if channels != 3:
            raise ValueError(f"LociS needs RGB frames (3 channels), actual image space: {space}; "
                             "convert grayscale / RGBA observations to RGB first")
    if use_depth and source[2] is None:
        raise ValueError(
            f"the model uses depth (config.use_depth=True) but the {what} provides none: expected a "
            f"Dict observation with a {depth_key!r} key next to the RGB image. Use an env with depth "
            "(e.g. locis/PushObjects-v0 in pixel mode) or a model trained without depth.")
    return source


def _features_out(features: dict[str, np.ndarray], flatten: bool) -> Any:
    return flatten_features(features) if flatten else features


class LociSWrapper(gym.Wrapper):
    """Recurrent Loci-s perception on one env: image observations become slot features.

    Args:
        env: an env with image observations, a Dict with ``rgb`` (+ optional ``depth``), or
            ``render_mode="rgb_array"``.
        model: a ``LociS`` instance, a packaged name (``"default"``: RGB; ``"depth"``: RGB + depth
            input, needs depth frames) or a checkpoint path.
        device: ``"auto"`` (CUDA if available) or a torch device.
        mode: slot-assignment mode for the model (``"seg"``, ``"reg"``, ``"rnd"``).
        flatten: one flat float32 ``Box (K * (G + 6),)`` instead of the ``Dict`` of features.
        rgb_key / depth_key: keys of a Dict observation (``rgb_key=None``: ``"rgb"`` or ``"pixels"``).
        seed: seed of the slot-state stream when ``reset`` gets no seed (None: OS entropy).
        num_slots: for a model given by name / path: run it with ``K = num_slots`` slots instead of
            its trained number (e.g. more slots for busier scenes; the weights load unchanged).
        model_overrides: for a model given by name / path: other inference-time config changes,
            e.g. ``{"assignment.warmup_inference": 5}`` (see :meth:`LociS.from_pretrained`).

    Observation space: ``Dict(gestalt (K, G), position (K, 4), depth (K, 1), presence (K,))``, all
    float32, with ``K`` the loaded model's (after ``num_slots``). ``render()`` returns the model's
    input frame (``S x S``) with the slot masks as a coloured overlay and the slot positions as
    crosses.

    Example:
        >>> import gymnasium as gym, envs
        >>> from locis_rl.model.locis import LociS
        >>> env = LociSWrapper(gym.make("locis/PushObjects-v0"), model=LociS("tiny"), device="cpu")
        >>> env.observation_space["gestalt"].shape
        (6, 96)
        >>> obs, info = env.reset(seed=0)
        >>> obs["position"].shape
        (6, 4)
    """

    def __init__(self, env: gym.Env, model: Any = "default", *, device: str = "auto",
                 mode: str | None = "seg", flatten: bool = False, rgb_key: str | None = None,
                 depth_key: str | None = "depth", seed: int | None = None, num_slots: int | None = None,
                 model_overrides: Mapping[str, Any] | None = None):
        super().__init__(env)
        self.perception = SlotPerception(model, num_envs=1, device=device, mode=mode, seed=seed,
                                         num_slots=num_slots, model_overrides=model_overrides)
        self.source = image_source(env.observation_space, env.render_mode, rgb_key, depth_key,
                                   self.perception.use_depth)
        self.flatten = bool(flatten)
        self.num_slots = self.perception.num_slots
        self.gestalt_dim = self.perception.gestalt_dim
        self.observation_space = self.perception.features_space(flatten=self.flatten)
        modes = list(env.metadata.get("render_modes", []))
        self.metadata = {**env.metadata, "render_modes": modes + ["rgb_array"] * ("rgb_array" not in modes)}

    def _frames(self, obs: Any) -> tuple[Any, Any]:
        kind, rgb_key, depth_key = self.source
        if kind == "obs":
            return np.asarray(obs)[None], None
        if kind == "dict":
            depth = None if depth_key is None else np.asarray(obs[depth_key])[None]
            return np.asarray(obs[rgb_key])[None], depth
        frame = self.env.render()
        if frame is None:
            raise RuntimeError("env.render() returned None; the env must render with "
                               "render_mode='rgb_array'")
        return np.asarray(frame)[None], None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        rgb, depth = self._frames(obs)
        features = self.perception.reset(rgb, depth, seed=seed)
        return self._single(features), info

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        rgb, depth = self._frames(obs)
        features = self.perception.step(rgb, depth)
        return self._single(features), reward, terminated, truncated, info

    def render(self) -> np.ndarray:
        """uint8 ``(S, S, 3)``: what the agent sees, with slot masks and positions drawn."""
        return self.perception.render()[0]

    def _single(self, features: dict[str, np.ndarray]) -> Any:
        return _features_out({k: v[0] for k, v in features.items()}, self.flatten)


class LociSVectorWrapper(VectorWrapper):
    """Recurrent Loci-s perception on a Gymnasium vector env: one batched model step for all envs.

    Handles every autoreset mode (read from ``env.metadata["autoreset_mode"]``):
      * ``NEXT_STEP``: the step after a done returns the reset observation of that row; its slot
        state is reset right before the model step on that observation.
      * ``SAME_STEP``: a done row's observation is already the next episode's first one. The model
        first steps that row on ``infos["final_obs"]`` (with its old state) - these final features
        replace ``infos["final_obs"]`` - then its state is reset and it steps on the new observation.
        With frames from ``render()`` there is no final frame; ``infos["final_obs"]`` is left as is.
      * ``DISABLED``: rows are reset by the user with ``reset(options={"reset_mask": mask})``.
    Partial resets (``options["reset_mask"]``, a bool array of shape ``(num_envs,)``) re-initialise
    only those rows; the other rows keep their state and report their last features again.

    Args: as :class:`LociSWrapper`; ``seed`` gives row ``i`` the slot-seed stream ``seed + i``.

    Example:
        >>> envs = gym.make_vec("locis/PushObjects-v0", num_envs=2, vectorization_mode="sync")
        >>> envs = LociSVectorWrapper(envs, model=LociS("tiny"), device="cpu")
        >>> obs, info = envs.reset(seed=0)
        >>> obs["gestalt"].shape
        (2, 6, 96)
    """

    def __init__(self, env: VectorEnv, model: Any = "default", *, device: str = "auto",
                 mode: str | None = "seg", flatten: bool = False, rgb_key: str | None = None,
                 depth_key: str | None = "depth", seed: int | None = None, num_slots: int | None = None,
                 model_overrides: Mapping[str, Any] | None = None):
        super().__init__(env)
        self.perception = SlotPerception(model, num_envs=env.num_envs, device=device, mode=mode,
                                         seed=seed, num_slots=num_slots, model_overrides=model_overrides)
        self.source = image_source(env.single_observation_space, env.render_mode, rgb_key, depth_key,
                                   self.perception.use_depth, what="vector env")
        mode_ = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        self.autoreset_mode = mode_ if isinstance(mode_, AutoresetMode) else AutoresetMode(mode_)
        self.flatten = bool(flatten)
        self.num_slots = self.perception.num_slots
        self.gestalt_dim = self.perception.gestalt_dim
        self.single_observation_space = self.perception.features_space(flatten=self.flatten)
        self.observation_space = self.perception.features_space(env.num_envs, flatten=self.flatten)
        self._needs_reset = np.zeros(env.num_envs, dtype=np.bool_)

    def _frames(self, obs: Any) -> tuple[Any, Any]:
        kind, rgb_key, depth_key = self.source
        if kind == "obs":
            return np.asarray(obs), None
        if kind == "dict":
            depth = None if depth_key is None else np.asarray(obs[depth_key])
            return np.asarray(obs[rgb_key]), depth
        frames = self.env.render()
        if frames is None:
            raise RuntimeError("the vector env's render() returned None; it needs "
                               "render_mode='rgb_array'")
        return np.stack([np.asarray(f) for f in frames]), None

    def _check_mask(self, mask: Any) -> np.ndarray:
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"options['reset_mask']: expected a numpy array, actual type: {type(mask)}")
        if mask.shape != (self.num_envs,):
            raise ValueError(f"options['reset_mask']: expected shape ({self.num_envs},), actual shape: "
                             f"{mask.shape}")
        if mask.dtype != np.bool_:
            raise ValueError(f"options['reset_mask']: expected dtype bool, actual dtype: {mask.dtype}")
        if not mask.any():
            raise ValueError(f"options['reset_mask']: expected at least one True value, actual value: "
                             f"{mask}")
        return mask

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        mask = None
        if options is not None and "reset_mask" in options:
            mask = self._check_mask(options["reset_mask"])
        obs, info = self.env.reset(seed=seed, options=options)
        rgb, depth = self._frames(obs)
        row_seed = seed
        if mask is not None and seed is not None and not isinstance(seed, (int, np.integer)):
            row_seed = [s for s, m in zip(seed, mask) if m]       # one seed per reset row
        elif mask is not None and isinstance(seed, (int, np.integer)):
            row_seed = [int(seed) + int(i) for i in np.flatnonzero(mask)]
        features = self.perception.reset(rgb, depth, mask=mask, seed=row_seed)
        if mask is None:
            self._needs_reset[:] = False
        else:
            self._needs_reset[mask] = False
        return _features_out(features, self.flatten), info

    def step(self, actions: Any):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        rgb, depth = self._frames(obs)
        done = np.logical_or(terminated, truncated)
        perception = self.perception
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            # Rows done at the last step now show their reset observation: their slot state is
            # re-initialised inside this (single, batched) model step.
            features = perception.step(rgb, depth, reset_mask=self._needs_reset)
            self._needs_reset = done.copy()
        elif self.autoreset_mode == AutoresetMode.SAME_STEP and done.any():
            final = info.get("final_obs") if self.source[0] != "render" else None
            if final is not None:
                # Done rows: first their final frames with the old state (final features), then a
                # new state on the first frame of the next episode (a step of those rows only).
                rgb_in, depth_in = self._with_final(rgb, depth, final, done)
                final_features = perception.step(rgb_in, depth_in)
                info = dict(info)
                info["final_obs"] = self._final_obs_info(final_features, done)
                features = perception.reset(rgb, depth, mask=done)
            else:
                # No final frame (frames from render()): just restart the done rows' state.
                features = perception.step(rgb, depth, reset_mask=done)
        else:
            # DISABLED (the user resets done rows) or SAME_STEP without a done row.
            features = perception.step(rgb, depth)
        return _features_out(features, self.flatten), reward, terminated, truncated, info

    def render(self) -> tuple[np.ndarray, ...]:
        """One uint8 ``(S, S, 3)`` frame per env with slot masks and positions drawn."""
        return tuple(self.perception.render())

    # ---- helpers ---------------------------------------------------------------------------
    def _with_final(self, rgb: np.ndarray, depth: Any, final: Any, done: np.ndarray):
        kind, rgb_key, depth_key = self.source
        rgb = rgb.copy()
        depth = None if depth is None else depth.copy()
        for i in np.flatnonzero(done):
            if kind == "obs":
                rgb[i] = np.asarray(final[i])
            elif isinstance(final, dict):  # Dict obs: final_obs is a dict of per-key object arrays
                rgb[i] = np.asarray(final[rgb_key][i])
                if depth is not None:
                    depth[i] = np.asarray(final[depth_key][i])
            else:
                rgb[i] = np.asarray(final[i][rgb_key])
                if depth is not None:
                    depth[i] = np.asarray(final[i][depth_key])
        return rgb, depth

    def _final_obs_info(self, features: dict[str, np.ndarray], done: np.ndarray) -> Any:
        """Final features of the done rows, shaped as Gymnasium shapes ``infos["final_obs"]``."""
        def column(values: np.ndarray) -> np.ndarray:
            col = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(done):
                col[i] = values[i]
            return col

        if self.flatten:
            return column(flatten_features(features))
        result: dict[str, np.ndarray] = {}
        for k, v in features.items():
            result[k] = column(v)
            result[f"_{k}"] = done.copy()
        return result
