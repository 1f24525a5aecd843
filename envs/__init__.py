"""MuJoCo scenes and tasks for locis-rl; importing this package registers the `locis/...` ids.

Registered ids:
  locis/MultiObject-v0  -> envs.multi_object:MultiObjectEnv  (MOVi-like videos, levels a-e)
  locis/PushObjects-v0  -> envs.push_objects:PushObjectsEnv  (pixel/state pushing task)

Headless rendering: when no X display exists, `MUJOCO_GL` defaults to "egl"; this is done here,
before anything in the package imports mujoco.
"""

import os as _os

if not _os.environ.get("DISPLAY"):
    _os.environ.setdefault("MUJOCO_GL", "egl")
if _os.environ.get("MUJOCO_GL") == "egl":
    _os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import gymnasium as _gym  # noqa: E402

_IDS = {
    "locis/MultiObject-v0": dict(entry_point="envs.multi_object:MultiObjectEnv", max_episode_steps=None),
    # PushObjects truncates by itself after `max_steps` (default 100).
    "locis/PushObjects-v0": dict(entry_point="envs.push_objects:PushObjectsEnv", max_episode_steps=None),
}


def register_envs() -> None:
    """Register the `locis/...` ids with Gymnasium; safe to call repeatedly."""
    for env_id, kwargs in _IDS.items():
        if env_id not in _gym.registry:
            _gym.register(id=env_id, **kwargs)


register_envs()

__all__ = ["register_envs"]
