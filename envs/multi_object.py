"""`locis/MultiObject-v0`: MOVi-like videos of objects that fall, slide and collide.

Difficulty ladder (`level`):
  "a"  3-6 simple geoms of canonical sizes, random colours, plain floor, fixed camera
  "b"  + random sizes and aspect ratios, random materials (specular/shininess), random key
       light, checkered floor in random colours
  "c"  + procedural textures on the objects, random floor pattern and random skybox (the floor
       is finite from level c on, so the skybox shows behind the table)
  "d"  + static clutter: 8-15 objects by default, about 50-70 % of them static
  "e"  as "d", with the camera moving smoothly along an arc around the table

Observation (Dict):
  rgb    uint8   (H, W, 3)
  depth  float32 (H, W, 1)  metric depth in metres from the camera (sky pixels: far plane, 20 m)
Action: Discrete(1), a no-op.
Info (never in the observation):
  segmentation  int32 (H, W): 0 = background (floor, sky), object ids 1..N stable for the episode
  objects       dict of numpy arrays for the N objects of the episode, sorted by id:
      id (N,) int32, position (N, 3) float64 world metres, quat (N, 4) (w, x, y, z),
      velocity (N, 3), color (N, 3) rgb in [0, 1], shape (N,) int32 index into
      `envs.scene.SHAPES` = ("box", "sphere", "cylinder", "capsule", "ellipsoid"),
      size (N, 3) half-extents in the object frame (see `envs.scene`), static (N,) bool
  camera        dict(position (3,), quat (4,)) of the rendering camera
Dynamic objects get ids 1..N_dyn, static clutter the ids after them.
"""

from __future__ import annotations

from .scene import (SHAPES, SceneLayout, TableSceneEnv, add_marks, check_image_size,
                    check_positive_int, look_at_pose, random_color, random_pattern, random_quat,
                    sample_positions, shape_params, texture_checker, texture_flat, texture_gradient,
                    yaw_quat, FLOOR_TEX)

import gymnasium as gym
import mujoco
import numpy as np

LEVELS = ("a", "b", "c", "d", "e")
_DEFAULT_NUM = {"a": (3, 6), "b": (3, 6), "c": (3, 6), "d": (8, 15), "e": (8, 15)}
_CANONICAL = np.array([(0.07, 0.07, 0.07), (0.08, 0.08, 0.08), (0.07, 0.07, 0.07),
                       (0.05, 0.05, 0.11), (0.09, 0.07, 0.06)])
ARENA_HALF = 0.5
CAM_LOOKAT = (0.0, 0.0, 0.0)
CAM_DISTANCE = 1.75
CAM_ELEVATION = 55.0
CAM_AZIMUTH = 0.0
MAX_OBJECTS = 30


class MultiObjectEnv(TableSceneEnv):
    """Objects falling, sliding and colliding on a walled table, rendered headless.

    Args:
        level: "a".."e" (see module docstring).
        image_size: square image side, a positive multiple of 16 (default 64).
        num_objects: (min, max) inclusive total object count; default (3, 6) for a-c and
            (8, 15) for d-e. 1 <= min <= max <= 30.
        frame_skip: physics steps (5 ms each) per env step (default 10 -> 20 fps).
        max_steps: truncate after this many steps (None: never).
        render_mode: None or "rgb_array".
    """

    def __init__(self, level: str = "a", image_size: int = 64, num_objects=None, frame_skip: int = 10,
                 max_steps: int | None = None, render_mode: str | None = None):
        if level not in LEVELS:
            raise ValueError(f"expected level in {LEVELS}, actual value: {level!r}")
        image_size = check_image_size(image_size)
        self.frame_skip = check_positive_int("frame_skip", frame_skip)
        self.max_steps = None if max_steps is None else check_positive_int("max_steps", max_steps)
        if num_objects is None:
            num_objects = _DEFAULT_NUM[level]
        try:
            lo, hi = (int(v) for v in num_objects)
            ok = all(float(v) == int(v) for v in num_objects) and 1 <= lo <= hi <= MAX_OBJECTS
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"expected num_objects to be a (min, max) pair of ints with "
                             f"1 <= min <= max <= {MAX_OBJECTS}, actual value: {num_objects!r}")
        self.level = level
        self.num_objects = (lo, hi)
        self._clutter = level in ("d", "e")
        layout = SceneLayout(arena_half=ARENA_HALF, n_free=hi, n_static=hi if self._clutter else 0,
                             image_size=image_size)
        self._init_scene(layout, image_size, render_mode)
        self.observation_space = self.pixel_space(image_size)
        self.action_space = gym.spaces.Discrete(1)
        self._floor_geom = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, "floor")
        self._info_static = np.zeros(0, bool)
        self._steps = 0

    # ------------------------------------------------------------------------------------------
    def _camera_pose(self, t: float):
        if self.level != "e":
            return look_at_pose(CAM_LOOKAT, CAM_DISTANCE, CAM_AZIMUTH, CAM_ELEVATION)
        az = self._cam_az0 + self._cam_rate * t
        el = CAM_ELEVATION + 6.0 * np.sin(self._cam_el_freq * t + self._cam_el_phase)
        return look_at_pose(CAM_LOOKAT, CAM_DISTANCE, az, el)

    def _randomise(self, rng: np.random.Generator) -> None:
        m, lvl = self.model, self.level
        rich = lvl != "a"
        textured = lvl in ("c", "d", "e")
        n = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        if self._clutter:
            n_static = min(n - 1, int(round(n * rng.uniform(0.5, 0.7))))
        else:
            n_static = 0
        n_dyn = n - n_static

        # appearance of the room
        if lvl == "a":
            floor = texture_flat(FLOOR_TEX, FLOOR_TEX, (0.55, 0.55, 0.55))
            sky_top, sky_bottom = np.array([0.55, 0.65, 0.8]), np.array([0.2, 0.22, 0.3])
        elif lvl == "b":
            c1, c2 = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
            floor = texture_checker(FLOOR_TEX, FLOOR_TEX, c1, c2, 8)
            sky_top, sky_bottom = np.array([0.55, 0.65, 0.8]), np.array([0.2, 0.22, 0.3])
        else:
            c1, c2 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
            floor = random_pattern(rng, FLOOR_TEX, FLOOR_TEX, c1, c2)
            sky_top, sky_bottom = rng.uniform(0.2, 1.0, 3), rng.uniform(0.0, 0.5, 3)
        self._write_texture(self._floor_tex, floor)
        # levels c-e: a finite floor so the randomised skybox shows behind the table
        m.geom_size[self._floor_geom, :2] = 3.0 if lvl in ("a", "b") else 1.0
        m.mat_texrepeat[self._floor_mat] = (4, 4) if lvl == "a" else rng.uniform(2, 6, 2)
        h, w = self._cube_texture_shape(self._sky_tex)  # cube: 6 faces of (w, w) stacked
        side = texture_gradient(w, w, sky_top, sky_bottom)
        sky = np.concatenate([side] * 4 + [texture_flat(w, w, sky_top), texture_flat(w, w, sky_bottom)])
        if textured:
            sky = add_marks(sky, rng, rng.uniform(0.0, 0.05), rng.uniform(size=3))
        self._write_texture(self._sky_tex, sky)

        # light
        if rich:
            az, el = rng.uniform(0, 2 * np.pi), rng.uniform(np.deg2rad(45), np.deg2rad(85))
            m.light_dir[self._light_id] = -np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
            m.light_diffuse[self._light_id] = rng.uniform(0.4, 0.85) * rng.uniform(0.8, 1.0, 3)
        else:
            m.light_dir[self._light_id] = (0.0, 0.3, -1.0) / np.linalg.norm((0.0, 0.3, -1.0))
            m.light_diffuse[self._light_id] = 0.6

        # objects
        shapes = rng.integers(len(SHAPES), size=n)
        extents = []
        for s in shapes:
            e = _CANONICAL[s].copy()
            if rich:
                e *= rng.uniform(0.7, 1.35) * rng.uniform(0.8, 1.2, 3)
                if SHAPES[s] in ("sphere",):
                    e[:] = e[0]
                elif SHAPES[s] in ("cylinder", "capsule"):
                    e[1] = e[0]
            extents.append(shape_params(int(s), e)["aabb"])
        colors = [random_color(rng) if rng.uniform() < 0.8 else rng.uniform(size=3) for _ in range(n)]
        radii = [float(np.linalg.norm(e[:2])) for e in extents]
        # static clutter first (so dynamic objects avoid it), then dynamic objects
        slot_of = list(range(n_dyn)) + [self.layout.n_free + i for i in range(n_static)]
        order = list(range(n_dyn, n)) + list(range(n_dyn))
        xy = sample_positions(rng, [radii[i] for i in order], ARENA_HALF - 0.02)
        pos = np.zeros((n, 2))
        pos[order] = xy
        self._geom_lut[:] = 0
        used = set()
        for i in range(n):
            k = slot_of[i]
            used.add(k)
            tex = None
            if textured:
                hh, ww = self._cube_texture_shape(self._slots[k]["tex"])
                other = np.clip(colors[i] * rng.uniform(0.2, 0.6) + rng.uniform(0, 0.3), 0, 1) \
                    if rng.uniform() < 0.7 else rng.uniform(size=3)
                tex = random_pattern(rng, hh, ww, colors[i], other)
            self._configure_slot(k, int(shapes[i]), extents[i], colors[i], tex,
                                 density=float(rng.uniform(300, 900)) if rich else 500.0)
            mat = self._slots[k]["mat"]
            if rich:
                m.mat_specular[mat] = rng.uniform(0.0, 0.8)
                m.mat_shininess[mat] = rng.uniform(0.0, 1.0)
            else:
                m.mat_specular[mat], m.mat_shininess[mat] = 0.3, 0.3
            self._geom_lut[self._slots[k]["geom"]] = i + 1
        for k in range(len(self._slots)):
            if k not in used:
                self._configure_slot(k, None)
        self._finish_model_edits()

        # initial state
        mujoco.mj_resetData(m, self.data)
        for k in range(self.layout.n_free):
            if k not in used:
                self._park_free(k)
        for i in range(n):
            s = self._slots[slot_of[i]]
            if i < n_dyn:
                rb = float(m.geom_rbound[s["geom"]])
                q, d = s["qpos"], s["dof"]
                self.data.qpos[q: q + 3] = (pos[i, 0], pos[i, 1], rb + rng.uniform(0.02, 0.3))
                self.data.qpos[q + 3: q + 7] = random_quat(rng)
                direction = -pos[i] + rng.normal(scale=0.25, size=2)
                direction /= max(np.linalg.norm(direction), 1e-6)
                self.data.qvel[d: d + 2] = direction * rng.uniform(0.4, 1.6)
                self.data.qvel[d + 3: d + 6] = rng.normal(scale=2.0, size=3)
            else:
                m.body_pos[s["body"]] = (pos[i, 0], pos[i, 1], extents[i][2])
                m.body_quat[s["body"]] = yaw_quat(rng.uniform(0, 2 * np.pi))
        self._n, self._n_dyn = n, n_dyn
        self._slot_of = slot_of
        self._info_shape = shapes.astype(np.int32)
        self._info_size = np.array(extents, dtype=np.float64).reshape(n, 3)
        self._info_color = np.array(colors, dtype=np.float64).reshape(n, 3)
        self._info_static = np.arange(n) >= n_dyn
        if self.level == "e":
            self._cam_az0 = rng.uniform(-60, 60)
            self._cam_rate = rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 40.0)
            self._cam_el_freq = rng.uniform(0.5, 1.5)
            self._cam_el_phase = rng.uniform(0, 2 * np.pi)

    def _objects(self) -> dict:
        n = self._n
        pos, quat, vel = np.zeros((n, 3)), np.zeros((n, 4)), np.zeros((n, 3))
        for i in range(n):
            b = self._slots[self._slot_of[i]]["body"]
            pos[i] = self.data.xpos[b]
            quat[i] = self.data.xquat[b]
            d = self._slots[self._slot_of[i]]["dof"]
            if d >= 0:
                vel[i] = self.data.qvel[d: d + 3]
        return dict(id=np.arange(1, n + 1, dtype=np.int32), position=pos, quat=quat, velocity=vel,
                    color=self._info_color.copy(), shape=self._info_shape.copy(),
                    size=self._info_size.copy(), static=self._info_static.copy())

    def _observe(self):
        pos, quat = self._camera_pose(float(self.data.time))
        self._set_camera(pos, quat)
        mujoco.mj_forward(self.model, self.data)
        frame = self._render_frame()
        obs = {"rgb": frame["rgb"], "depth": frame["depth"]}
        info = {"segmentation": frame["segmentation"], "objects": self._objects(),
                "camera": {"position": pos.copy(), "quat": quat.copy()}}
        return obs, info

    # ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Sample a new scene. Returns (obs, info) as described in the module docstring."""
        super().reset(seed=seed)
        self._randomise(self.np_random)
        self._steps = 0
        return self._observe()

    def step(self, action):
        """Advance `frame_skip` physics steps; reward 0, never terminates."""
        for _ in range(self.frame_skip):
            mujoco.mj_step(self.model, self.data)
        self._steps += 1
        obs, info = self._observe()
        truncated = self.max_steps is not None and self._steps >= self.max_steps
        return obs, 0.0, False, truncated, info
