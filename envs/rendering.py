"""Headless MuJoCo rendering: EGL setup and one lazily created `mujoco.Renderer` per env.

`SceneRenderer.render_all` makes one scene update per frame and renders three passes from it:

- rgb:  uint8   (H, W, 3)
- depth: float32 (H, W) metric depth in metres along the camera axis
- segmentation: int32 (H, W, 2) raw MuJoCo (object id, object type) per pixel, -1 for nothing
"""

from __future__ import annotations

import atexit
import os
import weakref


def ensure_headless_gl() -> None:
    """Select EGL for MuJoCo when no X display exists; call before `import mujoco`."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ.get("MUJOCO_GL") == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


ensure_headless_gl()

import mujoco  # noqa: E402
import numpy as np  # noqa: E402


def load_triton_before_gl() -> None:
    """Load Triton's native library, if Triton is installed, before the first GL context exists.

    Mesa's software EGL (llvmpipe, what headless CPU machines have) and Triton each link their own
    LLVM; whichever loads second crashes the process (segmentation fault). Torch loads Triton lazily
    (``torch._dynamo``, which TensorDict imports), so rendering first and importing the model
    afterwards in the same process crashed. Loaded first, both coexist. Call before
    ``mujoco.Renderer(...)``; a no-op when Triton is absent or already loaded.
    """
    global _TRITON_CHECKED
    if _TRITON_CHECKED:
        return
    _TRITON_CHECKED = True
    import importlib.util

    if os.environ.get("MUJOCO_GL") != "egl" or importlib.util.find_spec("triton") is None:
        return
    try:
        importlib.import_module("triton._C.libtriton")
    except Exception:  # noqa: BLE001 - a broken Triton install must not stop rendering
        pass


_TRITON_CHECKED = False


_LIVE: "weakref.WeakSet[SceneRenderer]" = weakref.WeakSet()


_ATEXIT_REGISTERED = False


def _close_all() -> None:
    """Free GL contexts of envs never closed, before interpreter teardown (avoids EGL errors)."""
    for sr in list(_LIVE):
        try:
            sr.close()
        except Exception:
            pass


class SceneRenderer:
    """Owns a `mujoco.Renderer` for one model; created on first use, freed by `close()`.

    The model's structure is fixed for the env's lifetime (scenes are randomised through model
    fields), so a single renderer serves every episode. Textures rewritten in `model.tex_data`
    are re-uploaded with `upload_textures`.
    """

    def __init__(self, model: mujoco.MjModel, height: int, width: int):
        self.model = model
        self.height = int(height)
        self.width = int(width)
        self._renderer: mujoco.Renderer | None = None
        self._pending_textures: set[int] = set()
        self.option = mujoco.MjvOption()
        # Groups 0-2 are drawn; group 3 holds invisible walls and unused object slots.
        self.option.geomgroup[:] = 0
        self.option.geomgroup[:3] = 1
        _LIVE.add(self)

    @property
    def renderer(self) -> mujoco.Renderer:
        if self._renderer is None:
            load_triton_before_gl()
            self._renderer = mujoco.Renderer(self.model, self.height, self.width)
            global _ATEXIT_REGISTERED
            if not _ATEXIT_REGISTERED:
                # Registered after mujoco's EGL display hook (created with the first context), so
                # it runs before the display is terminated: atexit handlers run last-in first-out.
                atexit.register(_close_all)
                _ATEXIT_REGISTERED = True
            self._pending_textures.clear()  # the new context uploaded the current textures
        return self._renderer

    def upload_textures(self, texture_ids) -> None:
        """Mark textures whose `model.tex_data` changed; they are uploaded before the next frame."""
        if self._renderer is not None:
            self._pending_textures.update(int(t) for t in texture_ids)

    def _flush_textures(self) -> None:
        if not self._pending_textures or self._renderer is None:
            return
        r = self._renderer
        ctx = getattr(r, "_mjr_context", None)
        gl = getattr(r, "_gl_context", None)
        if ctx is None or gl is None:  # unknown renderer internals: rebuild to pick textures up
            self.close()
            _ = self.renderer
            return
        gl.make_current()
        for tex_id in sorted(self._pending_textures):
            mujoco.mjr_uploadTexture(self.model, ctx, tex_id)
        self._pending_textures.clear()

    def render_all(self, data: mujoco.MjData, camera: int | str, *, depth: bool = True,
                   segmentation: bool = True) -> dict[str, np.ndarray]:
        """Render the current state once: one `update_scene`, then rgb (+ depth, + segmentation)."""
        r = self.renderer
        self._flush_textures()
        r.update_scene(data, camera=camera, scene_option=self.option)
        out = {"rgb": r.render().copy()}
        if depth:
            r.enable_depth_rendering()
            out["depth"] = r.render().astype(np.float32, copy=True)
            r.disable_depth_rendering()
        if segmentation:
            r.enable_segmentation_rendering()
            out["segmentation"] = r.render().copy()
            r.disable_segmentation_rendering()
        return out

    def close(self) -> None:
        if self._renderer is not None:
            try:
                self._renderer.close()
            finally:
                self._renderer = None
        self._pending_textures.clear()


def geom_segmentation(raw: np.ndarray, geom_lut: np.ndarray) -> np.ndarray:
    """Map raw (objid, objtype) (H, W, 2) to object ids (H, W) int32 via a geom-id lookup table.

    `geom_lut[g]` is the object id of geom `g` (0 = background); non-geom pixels become 0.
    """
    objid = raw[..., 0]
    is_geom = (raw[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM)) & (objid >= 0)
    ids = geom_lut[np.clip(objid, 0, len(geom_lut) - 1)]
    return np.where(is_geom, ids, 0).astype(np.int32)
