"""Shared table-top MuJoCo scene: MJCF builder, shape maths, procedural textures, camera poses.

Design: the MJCF is compiled once per env with a fixed number of object *slots*; every reset
randomises the scene through model fields (geom type/size, mass/inertia, material, texture
pixels, light, camera). Unused slots are hidden (geom group 3, no contacts, gravity
compensated, parked far away). This keeps resets cheap (no recompilation, one renderer per env).

Shapes (index = `info["objects"]["shape"]`): see `SHAPES`.
Object size convention (`info["objects"]["size"]`): half-extents (3,) of the object's
axis-aligned box in its own frame: box (a, b, c), sphere (r, r, r), cylinder (r, r, h),
capsule (r, r, r + half_length), ellipsoid (a, b, c). Metres.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rendering import SceneRenderer, ensure_headless_gl, geom_segmentation

ensure_headless_gl()

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = ("box", "sphere", "cylinder", "capsule", "ellipsoid")
_GEOM_TYPES = (
    mujoco.mjtGeom.mjGEOM_BOX,
    mujoco.mjtGeom.mjGEOM_SPHERE,
    mujoco.mjtGeom.mjGEOM_CYLINDER,
    mujoco.mjtGeom.mjGEOM_CAPSULE,
    mujoco.mjtGeom.mjGEOM_ELLIPSOID,
)
HIDDEN_GROUP = 3
OBJ_TEX = 16      # cube texture face size of object textures
FLOOR_TEX = 64    # 2-D floor texture size
SKY_TEX = 32      # skybox cube face size


# ----------------------------------------------------------------------------- shapes
def shape_params(shape: int, extent) -> dict:
    """MuJoCo geom parameters for shape index `shape` with half-extents `extent` (3,).

    Returns geom `size` (3,), bounding radius `rbound`, local `aabb` half sizes (3,), `volume`
    and unit-mass principal `inertia` (3,).
    """
    ex, ey, ez = (float(v) for v in extent)
    name = SHAPES[shape]
    if name == "box":
        size, aabb = (ex, ey, ez), (ex, ey, ez)
        rbound, vol = float(np.sqrt(ex * ex + ey * ey + ez * ez)), 8 * ex * ey * ez
        inertia = ((ey**2 + ez**2) / 3, (ex**2 + ez**2) / 3, (ex**2 + ey**2) / 3)
    elif name == "sphere":
        size, aabb, rbound = (ex, 0.0, 0.0), (ex, ex, ex), ex
        vol = 4 / 3 * np.pi * ex**3
        inertia = (0.4 * ex**2,) * 3
    elif name == "cylinder":
        size, aabb = (ex, ez, 0.0), (ex, ex, ez)
        rbound, vol = float(np.hypot(ex, ez)), np.pi * ex**2 * 2 * ez
        ixy = (3 * ex**2 + 4 * ez**2) / 12
        inertia = (ixy, ixy, 0.5 * ex**2)
    elif name == "capsule":
        half_len = max(ez - ex, 0.25 * ex)
        size, aabb, rbound = (ex, half_len, 0.0), (ex, ex, ex + half_len), ex + half_len
        vol = np.pi * ex**2 * 2 * half_len + 4 / 3 * np.pi * ex**3
        full = half_len + ex  # treat as a cylinder of the full length
        ixy = (3 * ex**2 + 4 * full**2) / 12
        inertia = (ixy, ixy, 0.5 * ex**2)
    elif name == "ellipsoid":
        size, aabb, rbound = (ex, ey, ez), (ex, ey, ez), max(ex, ey, ez)
        vol = 4 / 3 * np.pi * ex * ey * ez
        inertia = ((ey**2 + ez**2) / 5, (ex**2 + ez**2) / 5, (ex**2 + ey**2) / 5)
    else:  # pragma: no cover
        raise ValueError(f"expected a shape index in [0, {len(SHAPES)}), actual value: {shape}")
    return dict(size=np.array(size), rbound=float(rbound), aabb=np.array(aabb),
                volume=float(vol), inertia=np.array(inertia))


def true_extent(shape: int, extent) -> np.ndarray:
    """Half-extents actually realised by `shape_params` (capsules clamp their half-length)."""
    return shape_params(shape, extent)["aabb"]


# ----------------------------------------------------------------------------- colours / textures
def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def random_color(rng: np.random.Generator, avoid_hue: float | None = None, gap: float = 0.12):
    """A saturated random rgb in [0, 1]; hues within `gap` of `avoid_hue` are excluded."""
    while True:
        h = rng.uniform()
        if avoid_hue is None or min(abs(h - avoid_hue), 1 - abs(h - avoid_hue)) > gap:
            break
    return hsv_to_rgb(h, rng.uniform(0.5, 0.95), rng.uniform(0.55, 1.0))


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def texture_flat(h: int, w: int, c) -> np.ndarray:
    return _to_u8(np.broadcast_to(np.asarray(c, float), (h, w, 3)))


def texture_checker(h: int, w: int, c1, c2, cells: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(h) * cells // h, np.arange(w) * cells // w, indexing="ij")
    mask = ((yy + xx) % 2 == 0)[..., None]
    return _to_u8(np.where(mask, np.asarray(c1, float), np.asarray(c2, float)))


def texture_stripes(h: int, w: int, c1, c2, n: int, vertical: bool) -> np.ndarray:
    coord = np.arange(w if vertical else h) * n * 2 // (w if vertical else h)
    band = (coord % 2 == 0)
    mask = np.broadcast_to(band[None, :] if vertical else band[:, None], (h, w))[..., None]
    return _to_u8(np.where(mask, np.asarray(c1, float), np.asarray(c2, float)))


def texture_gradient(h: int, w: int, c1, c2) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    img = (1 - t) * np.asarray(c1, float) + t * np.asarray(c2, float)
    return _to_u8(np.broadcast_to(img, (h, w, 3)))


def add_marks(img: np.ndarray, rng: np.random.Generator, frac: float, c) -> np.ndarray:
    """Sprinkle a fraction `frac` of pixels with colour `c` (like MuJoCo's mark="random")."""
    mask = rng.uniform(size=img.shape[:2]) < frac
    out = img.copy()
    out[mask] = _to_u8(np.asarray(c, float))
    return out


def random_pattern(rng: np.random.Generator, h: int, w: int, c1, c2) -> np.ndarray:
    kind = int(rng.integers(4))
    if kind == 0:
        img = texture_checker(h, w, c1, c2, int(rng.integers(2, 6)) * 2)
    elif kind == 1:
        img = texture_stripes(h, w, c1, c2, int(rng.integers(2, 5)), bool(rng.integers(2)))
    elif kind == 2:
        img = texture_gradient(h, w, c1, c2)
    else:
        img = texture_flat(h, w, c1)
    if rng.uniform() < 0.5:
        img = add_marks(img, rng, rng.uniform(0.02, 0.12), c2 if kind == 3 else rng.uniform(size=3))
    return img


# ----------------------------------------------------------------------------- camera
def look_at_pose(lookat, distance: float, azimuth_deg: float, elevation_deg: float):
    """Camera position (3,) and MuJoCo quaternion (4,) looking at `lookat` from the given angles.

    Azimuth 0 places the camera on the -y side looking towards +y; elevation is measured
    downward from the horizontal (45-60 deg looks down at the table).
    """
    az, el = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
    offset = np.array([np.sin(az) * np.cos(el), -np.cos(az) * np.cos(el), np.sin(el)])
    pos = np.asarray(lookat, float) + distance * offset
    forward = -offset
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    mat = np.stack([right, up, -forward], axis=1)  # columns: camera x, y, z axes
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, mat.reshape(-1))
    return pos, quat


# ----------------------------------------------------------------------------- MJCF
@dataclass
class SceneLayout:
    arena_half: float          # walls at +-arena_half (invisible)
    n_free: int                # dynamic object slots (free joints)
    n_static: int = 0          # static clutter slots (welded to the world)
    pusher: bool = False       # a pusher on x/y slide joints with velocity actuators
    goal: bool = False         # a visual goal patch on the floor
    image_size: int = 64
    timestep: float = 0.005
    free_damping: float = 0.0
    pusher_radius: float = 0.035
    pusher_kv: float = 30.0
    fovy: float = 45.0


def build_scene_xml(lay: SceneLayout) -> str:
    """MJCF for a table with `lay.n_free` + `lay.n_static` hidden object slots (see module doc)."""
    off = max(640, lay.image_size)
    a = lay.arena_half
    wall_h = 0.4
    assets = [
        f'<texture name="tex_sky" type="skybox" builtin="flat" rgb1=".5 .6 .7" rgb2=".1 .1 .2" '
        f'width="{SKY_TEX}" height="{SKY_TEX}"/>',
        f'<texture name="tex_floor" type="2d" builtin="flat" rgb1=".5 .5 .5" rgb2=".5 .5 .5" '
        f'width="{FLOOR_TEX}" height="{FLOOR_TEX}"/>',
        '<material name="mat_floor" texture="tex_floor" texrepeat="4 4" texuniform="false"/>',
    ]
    bodies = []
    slots = [("obj", i, True) for i in range(lay.n_free)] + [("clutter", i, False) for i in range(lay.n_static)]
    for k, (prefix, i, free) in enumerate(slots):
        name = f"{prefix}{i}"
        assets.append(f'<texture name="tex_{name}" type="cube" builtin="flat" rgb1="1 1 1" rgb2="1 1 1" '
                      f'width="{OBJ_TEX}" height="{OBJ_TEX}"/>')
        assets.append(f'<material name="mat_{name}" texture="tex_{name}"/>')
        park = f"{5.0 + 0.5 * k} 5 0.2"
        joint = (f'<freejoint name="{name}_joint"/>' if lay.free_damping <= 0 else
                 f'<joint name="{name}_joint" type="free" damping="{lay.free_damping}"/>') if free else ""
        grav = ' gravcomp="1"' if free else ""
        bodies.append(f'<body name="{name}" pos="{park}"{grav}>{joint}'
                      f'<geom name="{name}_geom" type="box" size=".05 .05 .05" material="mat_{name}" '
                      f'group="{HIDDEN_GROUP}" contype="0" conaffinity="0" mass="1"/></body>')
    walls = []
    for j, (x, y, sx, sy) in enumerate([(a + 0.05, 0, 0.05, a + 0.1), (-a - 0.05, 0, 0.05, a + 0.1),
                                        (0, a + 0.05, a + 0.1, 0.05), (0, -a - 0.05, a + 0.1, 0.05)]):
        walls.append(f'<geom name="wall{j}" type="box" pos="{x} {y} {wall_h}" size="{sx} {sy} {wall_h}" '
                     f'group="{HIDDEN_GROUP}" rgba="0 0 0 0"/>')
    extra, actuators = [], []
    if lay.goal:
        extra.append('<geom name="goal" type="cylinder" pos="0 0 0.001" size="0.06 0.001" '
                     'rgba="0.15 0.8 0.25 1" contype="0" conaffinity="0"/>')
    if lay.pusher:
        r = lay.pusher_radius
        extra.append(f'<body name="pusher" pos="0 0 {r + 0.008}">'
                     '<joint name="pusher_x" type="slide" axis="1 0 0" damping="0.5"/>'
                     '<joint name="pusher_y" type="slide" axis="0 1 0" damping="0.5"/>'
                     f'<geom name="pusher_geom" type="cylinder" size="{r} {r}" rgba="0.9 0.9 0.9 1" '
                     'mass="0.5"/></body>')
        for ax in "xy":
            actuators.append(f'<velocity name="act_{ax}" joint="pusher_{ax}" kv="{lay.pusher_kv}" '
                             'ctrlrange="-1 1" forcerange="-25 25" ctrllimited="true" forcelimited="true"/>')
    return f"""<mujoco model="locis_table">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{lay.timestep}" integrator="implicitfast"/>
  <statistic extent="1" center="0 0 0.1"/>
  <visual>
    <global offwidth="{off}" offheight="{off}" fovy="{lay.fovy}"/>
    <quality shadowsize="1024"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.25 0.25 0.25" specular="0.05 0.05 0.05"/>
    <map znear="0.02" zfar="20"/>
  </visual>
  <default><geom friction="0.6 0.005 0.0001" solref="0.01 1"/></default>
  <asset>{''.join(assets)}</asset>
  <worldbody>
    <light name="key" directional="true" pos="0 0 3" dir="0 0.3 -1" diffuse="0.6 0.6 0.6" castshadow="true"/>
    <camera name="main" pos="0 -1.5 1.5" xyaxes="1 0 0 0 0.7 0.7" fovy="{lay.fovy}"/>
    <geom name="floor" type="plane" size="3 3 0.1" material="mat_floor"/>
    {''.join(walls)}
    {''.join(extra)}
    {''.join(bodies)}
  </worldbody>
  <actuator>{''.join(actuators)}</actuator>
</mujoco>"""


# ----------------------------------------------------------------------------- base env
class TableSceneEnv(gym.Env):
    """Common machinery of the table scenes; subclasses implement the task.

    Attributes `model` / `data` are the MuJoCo `MjModel` / `MjData` (the dataset recorder
    detects MuJoCo envs through them).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def _init_scene(self, layout: SceneLayout, image_size: int, render_mode: str | None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"expected render_mode in {self.metadata['render_modes']} or None, "
                             f"actual value: {render_mode!r}")
        self.render_mode = render_mode
        self.image_size = image_size
        self.layout = layout
        self.model = mujoco.MjModel.from_xml_string(build_scene_xml(layout))
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._cam_id = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, "main")
        self._floor_tex = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_TEXTURE, "tex_floor")
        self._sky_tex = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_TEXTURE, "tex_sky")
        self._floor_mat = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_MATERIAL, "mat_floor")
        self._light_id = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_LIGHT, "key")
        self._slots = []  # (body, geom, material, texture, qpos adr or -1, dof adr or -1)
        for prefix, n in (("obj", layout.n_free), ("clutter", layout.n_static)):
            for i in range(n):
                name = f"{prefix}{i}"
                body = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, name)
                jnt = m.body_jntadr[body]
                self._slots.append(dict(
                    body=body, geom=mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, f"{name}_geom"),
                    mat=mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_MATERIAL, f"mat_{name}"),
                    tex=mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_TEXTURE, f"tex_{name}"),
                    qpos=int(m.jnt_qposadr[jnt]) if jnt >= 0 else -1,
                    dof=int(m.jnt_dofadr[jnt]) if jnt >= 0 else -1,
                    park=m.body_pos[body].copy()))
        self._scene_renderer = SceneRenderer(m, image_size, image_size)
        self._geom_lut = np.zeros(m.ngeom, dtype=np.int32)
        self._dirty_tex: set[int] = set()
        self._last_rgb: np.ndarray | None = None

    # -- model-field edits ------------------------------------------------------------------
    def _write_texture(self, tex_id: int, img: np.ndarray) -> None:
        m = self.model
        h, w, nc = int(m.tex_height[tex_id]), int(m.tex_width[tex_id]), int(m.tex_nchannel[tex_id])
        adr = int(m.tex_adr[tex_id])
        if nc == 4:
            img = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        m.tex_data[adr: adr + h * w * nc] = img.reshape(-1)
        self._dirty_tex.add(tex_id)

    def _cube_texture_shape(self, tex_id: int) -> tuple[int, int]:
        return int(self.model.tex_height[tex_id]), int(self.model.tex_width[tex_id])

    def _configure_slot(self, k: int, shape: int | None, extent=None, rgb=None, texture=None,
                        density: float = 400.0, friction: float = 0.6) -> None:
        """Activate slot `k` as `SHAPES[shape]` with half-extents, or hide it when shape is None."""
        m, s = self.model, self._slots[k]
        g, b = s["geom"], s["body"]
        if shape is None:
            m.geom_group[g] = HIDDEN_GROUP
            m.geom_contype[g] = m.geom_conaffinity[g] = 0
            if s["qpos"] < 0:
                m.body_pos[b] = s["park"]
            else:
                m.body_gravcomp[b] = 1.0
            return
        p = shape_params(shape, extent)
        m.geom_type[g] = _GEOM_TYPES[shape]
        m.geom_size[g] = p["size"]
        m.geom_rbound[g] = p["rbound"]
        m.geom_aabb[g] = np.concatenate([np.zeros(3), p["aabb"]])
        m.geom_group[g] = 0
        m.geom_contype[g] = m.geom_conaffinity[g] = 1
        m.geom_friction[g, 0] = friction
        mass = density * p["volume"]
        m.body_mass[b] = mass
        m.body_inertia[b] = np.maximum(mass * p["inertia"], 1e-7)
        if s["qpos"] >= 0:
            m.body_gravcomp[b] = 0.0
        m.mat_rgba[s["mat"]] = 1.0
        h, w = self._cube_texture_shape(s["tex"])
        if texture is None:
            texture = texture_flat(h, w, rgb)
        self._write_texture(s["tex"], texture)

    def _finish_model_edits(self) -> None:
        mujoco.mj_setConst(self.model, self.data)
        self._scene_renderer.upload_textures(self._dirty_tex)
        self._dirty_tex.clear()

    def _set_camera(self, pos, quat) -> None:
        self.model.cam_pos[self._cam_id] = pos
        self.model.cam_quat[self._cam_id] = quat

    def _park_free(self, k: int) -> None:
        s = self._slots[k]
        self.data.qpos[s["qpos"]: s["qpos"] + 3] = s["park"]
        self.data.qpos[s["qpos"] + 3: s["qpos"] + 7] = (1, 0, 0, 0)
        self.data.qvel[s["dof"]: s["dof"] + 6] = 0.0

    # -- rendering ---------------------------------------------------------------------------
    def _render_frame(self, depth: bool = True, segmentation: bool = True) -> dict[str, np.ndarray]:
        out = self._scene_renderer.render_all(self.data, self._cam_id, depth=depth,
                                              segmentation=segmentation)
        if "depth" in out:
            out["depth"] = out["depth"][..., None]
        if "segmentation" in out:
            out["segmentation"] = geom_segmentation(out["segmentation"], self._geom_lut)
        self._last_rgb = out["rgb"]
        return out

    def render(self):
        """rgb_array: the current camera frame, uint8 (H, W, 3)."""
        if self.render_mode != "rgb_array":
            return None
        if self._last_rgb is None:
            self._render_frame(depth=False, segmentation=False)
        return self._last_rgb.copy()

    def close(self):
        sr = getattr(self, "_scene_renderer", None)
        if sr is not None:
            sr.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def pixel_space(size: int) -> gym.spaces.Dict:
        return gym.spaces.Dict({
            "rgb": gym.spaces.Box(0, 255, (size, size, 3), np.uint8),
            "depth": gym.spaces.Box(0.0, np.inf, (size, size, 1), np.float32),
        })


def check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size <= 0 or image_size % 16:
        raise ValueError(f"expected image_size to be a positive multiple of 16, actual value: {image_size!r}")
    return int(image_size)


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"expected {name} to be an int >= {minimum}, actual value: {value!r}")
    return int(value)


def sample_positions(rng: np.random.Generator, radii, half: float, fixed=(), margin: float = 0.01,
                     tries: int = 200) -> np.ndarray:
    """Rejection-sample non-overlapping xy discs of `radii` inside [-half, half]^2.

    `fixed` is a list of (x, y, r) discs already placed. Falls back to an overlapping spot after
    `tries` failures (physics separates the objects).
    """
    placed = [tuple(f) for f in fixed]
    out = np.zeros((len(radii), 2))
    for i, r in enumerate(radii):
        lim = max(half - r, 0.0)
        for _ in range(tries):
            p = rng.uniform(-lim, lim, size=2)
            if all(np.hypot(p[0] - x, p[1] - y) > r + rr + margin for x, y, rr in placed):
                break
        out[i] = p
        placed.append((p[0], p[1], r))
    return out


def random_quat(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def yaw_quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])
