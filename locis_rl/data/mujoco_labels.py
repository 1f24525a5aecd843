"""Depth and instance segmentation for any MuJoCo model, rendered with ``mujoco.Renderer``.

What counts as an object
------------------------
By default (``level="root"``) an object is a child of the world body together with its whole
subtree, so an articulated robot arm is one object, not one per link. Object ids are ``1..N`` in
the order of those root bodies in the model (``model.body_rootid``), hence stable over an episode
and over every episode of the same model. Geoms (and sites) attached to the world body itself --
floor, walls, rails -- and pixels showing no geometry at all are background ``0``.
``level="body"`` gives every non-world body its own id (``1..nbody-1`` = body id).

Camera
------
:func:`camera_for_env` reproduces the camera the env's own ``render()`` uses:

* gymnasium ``MujocoEnv`` (has ``mujoco_renderer``): if ``mujoco_renderer.camera_id`` is a model
  camera, that fixed camera; otherwise gymnasium's default free camera -- ``lookat`` at the median
  of the geom positions, ``distance`` = model extent -- with the env's ``default_cam_config``
  applied on top, exactly as gymnasium's ``OffScreenViewer`` does when it is created. We rebuild it
  after each reset so every episode is rendered the same way whatever process records it.
* an env with an integer/str ``render_camera``, ``camera_id`` or ``camera_name`` attribute: that camera.
* anything else: MuJoCo's default free camera (-1).

Rendering cost: our renderer uses a shadow map of ``max(1024, 16 * image side)`` texels (capped
at the model's own ``shadowsize``) instead of MuJoCo's default 4096, ~5x faster rgb at 64x64
with practically identical pixels.

Depth is metric (distance along the optical axis, in model length units, normally metres), as
``mujoco.Renderer`` returns it after linearisation; pixels seeing nothing carry the far-plane depth.
"""
from __future__ import annotations

import os

if not os.environ.get("DISPLAY"):
    # Must happen before mujoco is first imported; headless machines render through EGL.
    os.environ.setdefault("MUJOCO_GL", "egl")

from typing import Any  # noqa: E402

import numpy as np  # noqa: E402


def mujoco_handles(env: Any) -> tuple[Any, Any] | None:
    """Return ``(model, data)`` as raw ``mujoco.MjModel``/``MjData`` if ``env`` is MuJoCo-based, else None.

    Looks at ``env.unwrapped.model/.data`` (gymnasium MuJoCo envs, our scenes, the dm_control
    adapter) and at ``env.unwrapped.physics`` (dm_control physics, via ``.model.ptr``).
    """
    import mujoco

    u = getattr(env, "unwrapped", env)
    model, data = getattr(u, "model", None), getattr(u, "data", None)
    if model is None and getattr(u, "physics", None) is not None:
        model, data = u.physics.model, u.physics.data
    model = getattr(model, "ptr", model)  # dm_control wrappers
    data = getattr(data, "ptr", data)
    if isinstance(model, mujoco.MjModel) and isinstance(data, mujoco.MjData):
        return model, data
    return None


def object_lookup(model: Any, level: str = "root") -> tuple[np.ndarray, list[str]]:
    """Body id -> object id table (int64, shape ``(nbody,)``) and the object names (index = id - 1)."""
    import mujoco

    nbody = model.nbody
    lut = np.zeros(nbody, dtype=np.int64)
    if level == "root":
        roots = np.asarray(model.body_rootid, dtype=np.int64)
        root_ids = np.unique(roots[roots > 0])  # children of the world body, in model order
        table = np.zeros(nbody, dtype=np.int64)
        table[root_ids] = np.arange(1, len(root_ids) + 1)
        lut = table[roots]
        owners = root_ids
    elif level == "body":
        lut = np.arange(nbody, dtype=np.int64)
        owners = np.arange(1, nbody)
    else:
        raise ValueError(f"unknown segmentation level {level!r}; use 'root' or 'body'")
    names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, int(b)) or f"body{int(b)}" for b in owners]
    return lut, names


class SegmentationLabeler:
    """Maps MuJoCo's ``(objid, objtype)`` segmentation image to object ids via numpy lookup tables."""

    def __init__(self, model: Any, level: str = "root"):
        import mujoco

        body_lut, self.object_names = object_lookup(model, level)
        self.num_objects = len(self.object_names)
        self._geom = body_lut[np.asarray(model.geom_bodyid, dtype=np.int64)] if model.ngeom else np.zeros(0, np.int64)
        self._site = body_lut[np.asarray(model.site_bodyid, dtype=np.int64)] if model.nsite else np.zeros(0, np.int64)
        self._geom_t = int(mujoco.mjtObj.mjOBJ_GEOM)
        self._site_t = int(mujoco.mjtObj.mjOBJ_SITE)
        self.dtype = np.uint8 if self.num_objects < 256 else (np.uint16 if self.num_objects < 65536 else np.int32)

    def __call__(self, seg: np.ndarray) -> np.ndarray:
        """``seg``: (H, W, 2) int ``[objid, objtype]`` with objid -1 for nothing -> (H, W) object ids."""
        objid, objtype = seg[..., 0], seg[..., 1]
        out = np.zeros(objid.shape, dtype=self.dtype)
        for table, t in ((self._geom, self._geom_t), (self._site, self._site_t)):
            m = (objtype == t) & (objid >= 0) & (objid < len(table))
            if m.any():
                out[m] = table[objid[m]]
        return out  # other object types (skins, flexes, decor) count as background


def camera_for_env(env: Any, model: Any, data: Any) -> Any:
    """The camera (``int`` id or ``mujoco.MjvCamera``) that matches the env's own ``render()``."""
    import mujoco

    u = getattr(env, "unwrapped", env)
    mr = getattr(u, "mujoco_renderer", None)
    if mr is not None:
        cam = mujoco.MjvCamera()
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.fixedcamid = -1
        if model.ngeom:
            cam.lookat[:] = np.median(np.asarray(data.geom_xpos), axis=0)
        cam.distance = model.stat.extent
        for key, value in (getattr(mr, "default_cam_config", None) or {}).items():
            if isinstance(value, np.ndarray):
                getattr(cam, key)[:] = value
            else:
                setattr(cam, key, value)
        cid = getattr(mr, "camera_id", None)
        if cid is not None and cid != -1:
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = int(cid)
        return cam
    for attr in ("render_camera", "camera_id", "camera_name"):
        cam = getattr(u, attr, None)
        if isinstance(cam, (int, np.integer)) and not isinstance(cam, bool):
            return int(cam)
        if isinstance(cam, str) and mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, cam) >= 0:
            return cam
    return -1


class MujocoLabelRenderer:
    """One ``mujoco.Renderer`` producing aligned rgb, metric depth and object segmentation.

    All three come from the same camera at the same size, so they are pixel-aligned by
    construction. Call :meth:`close` (or use as a context manager) to free the GL context.
    """

    def __init__(self, model: Any, data: Any, height: int, width: int, level: str = "root",
                 shadow_size: int | None = None):
        import mujoco

        # The offscreen buffer must be at least as large as the requested image.
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), int(width))
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), int(height))
        self.model, self.data = model, data
        self.height, self.width = int(height), int(width)
        self.labeler = SegmentationLabeler(model, level)
        # Shadow map resolution of *our* GL context only (read when the MjrContext is created):
        # MuJoCo's default 4096^2 map costs ~5x the whole rgb pass of a 64x64 image on a software
        # GL, while max(1024, 16 * image side) gives practically the same pixels (tested: mean
        # |diff| < 1e-3 on HalfCheetah at 64x64). The env's own model setting is restored at once.
        original = int(model.vis.quality.shadowsize)
        if shadow_size is None:
            shadow_size = min(original, max(1024, 16 * max(self.height, self.width)))
        model.vis.quality.shadowsize = int(shadow_size)
        try:
            from envs.rendering import load_triton_before_gl

            load_triton_before_gl()
            self._renderer = mujoco.Renderer(model, self.height, self.width)
        finally:
            model.vis.quality.shadowsize = original
        self.camera: Any = -1

    @property
    def object_names(self) -> list[str]:
        return self.labeler.object_names

    def render(self, camera: Any = None, rgb: bool = True) -> dict[str, np.ndarray]:
        r = self._renderer
        cam = self.camera if camera is None else camera
        out: dict[str, np.ndarray] = {}
        r.update_scene(self.data, camera=cam)
        if rgb:
            r.disable_depth_rendering()
            r.disable_segmentation_rendering()
            out["rgb"] = r.render().copy()
        r.enable_depth_rendering()
        out["depth"] = r.render().astype(np.float32, copy=True)[..., None]
        r.disable_depth_rendering()
        r.enable_segmentation_rendering()
        out["segmentation"] = self.labeler(r.render())
        r.disable_segmentation_rendering()
        return out

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> "MujocoLabelRenderer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
