"""`locis/PushObjects-v0`: push the red target object into the green goal patch among distractors.

Table: 0.6 m x 0.6 m with invisible walls. The pusher (a near-black cylinder, radius 3.5 cm) moves on
x/y slide joints driven by velocity actuators: action (2,) in [-1, 1] -> velocity command
`action * max_speed` (default 0.5 m/s). One env step = `frame_skip` (10) physics steps of 5 ms.

Reward (per step), with d_tg = |target - goal| and d_pt = |pusher - target| (xy, metres):
    10 * (d_tg_prev - d_tg) + 2 * (d_pt_prev - d_pt)     progress (potential differences)
    - 0.5 * d_tg - 0.25 * d_pt                              distance costs (favour finishing fast)
    + success_bonus (10) on the step where the target centre enters the goal disc
      (radius `goal_radius`, 8 cm). `terminated` on success, `truncated` after `max_steps` (100).

Observation, `obs_mode="pixels"` (default): Dict(rgb uint8 (H, W, 3), depth float32 (H, W, 1)
metric depth in metres, camera 0.85 m from the table centre, 60 deg down).
`obs_mode="state"`: float32 Box of size 14 + 5 * state_distractors, positions (and differences)
divided by `STATE_POS_SCALE` = 0.3 m (table edge at +-1), velocities divided by
`max_speed`:
    [0:4]   pusher x, y, vx, vy
    [4:8]   target x, y, vx, vy
    [8:10]  goal x, y
    [10:12] target - pusher (dx, dy)
    [12:14] goal - target (dx, dy)
    then for the `state_distractors` (default 3) distractors nearest to the pusher, nearest first:
            x, y, vx, vy, present (1.0; rows of absent distractors are all zeros)
so the size is independent of `num_distractors`.

Info:
  segmentation  int32 (H, W) (pixel mode, or state mode with `info_segmentation=True`):
                0 = background (floor, goal patch), 1 = pusher, 2 = target, 3.. = distractors
  objects       id (N,), position (N, 3), quat (N, 4), velocity (N, 3), color (N, 3),
                shape (N,) index into envs.scene.SHAPES (pusher and target = 2 "cylinder"),
                size (N, 3) half-extents, static (N,) bool; N = 2 + num_distractors, sorted by id
  goal_position (2,), goal_radius, distance (target-goal), is_success
"""

from __future__ import annotations

from .scene import (SHAPES, SceneLayout, TableSceneEnv, check_image_size, check_positive_int,
                    look_at_pose, random_color, sample_positions, shape_params, texture_flat,
                    yaw_quat, FLOOR_TEX)

import gymnasium as gym
import mujoco
import numpy as np

PUSHER_ID, TARGET_ID = 1, 2
ARENA_HALF = 0.3
TARGET_COLOR = np.array([0.9, 0.08, 0.08])
GOAL_COLOR = np.array([0.15, 0.8, 0.25])
# Dark, not light grey: the shipped checkpoint's background module absorbs a light-grey pusher into the
# grey floor, so no slot ever held it (0 % of its pixels under a slot vs ~0.9 with this colour and
# 8 slots); an agent reading slots must see its own effector.
PUSHER_COLOR = np.array([0.1, 0.1, 0.12])
TARGET_EXTENT = np.array([0.045, 0.045, 0.04])  # target: an upright red cylinder
_DISTRACTOR_EXTENT = np.array([(0.045, 0.045, 0.04), (0.045, 0.045, 0.045), (0.045, 0.045, 0.04),
                               (0.035, 0.035, 0.07), (0.055, 0.045, 0.035)])
CAM_DISTANCE, CAM_ELEVATION, CAM_AZIMUTH = 0.85, 60.0, 0.0
MAX_DISTRACTORS = 20
STATE_POS_SCALE = ARENA_HALF  # state positions are divided by this (table edge = +-1)


class PushObjectsEnv(TableSceneEnv):
    """Pushing task (see module docstring for spaces, reward and info).

    Args:
        num_distractors: other objects on the table (0..20, default 3).
        obs_mode: "pixels" (default) or "state".
        image_size: positive multiple of 16 (default 64).
        max_steps: episode length before truncation (default 100).
        frame_skip: physics steps per env step (default 10).
        state_distractors: distractors listed in the state observation (default 3).
        goal_radius: success radius in metres (default 0.08).
        max_speed: pusher speed at |action| = 1 in m/s (default 0.5, at most 1).
        success_bonus: reward added on success (default 10).
        info_segmentation: render segmentation into info in state mode too (default False).
        render_mode: None or "rgb_array".
    """

    def __init__(self, num_distractors: int = 3, obs_mode: str = "pixels", image_size: int = 64,
                 max_steps: int = 100, frame_skip: int = 10, state_distractors: int = 3,
                 goal_radius: float = 0.08, max_speed: float = 0.5, success_bonus: float = 10.0,
                 info_segmentation: bool = False, render_mode: str | None = None):
        if obs_mode not in ("pixels", "state"):
            raise ValueError(f"expected obs_mode in ('pixels', 'state'), actual value: {obs_mode!r}")
        image_size = check_image_size(image_size)
        nd = check_positive_int("num_distractors", num_distractors, minimum=0)
        if nd > MAX_DISTRACTORS:
            raise ValueError(f"expected num_distractors <= {MAX_DISTRACTORS}, actual value: {num_distractors!r}")
        self.num_distractors = nd
        self.max_steps = check_positive_int("max_steps", max_steps)
        self.frame_skip = check_positive_int("frame_skip", frame_skip)
        self.state_distractors = check_positive_int("state_distractors", state_distractors, minimum=0)
        if not (isinstance(goal_radius, (int, float)) and 0.0 < goal_radius < ARENA_HALF):
            raise ValueError(f"expected goal_radius in (0, {ARENA_HALF}), actual value: {goal_radius!r}")
        if not (isinstance(max_speed, (int, float)) and 0.0 < max_speed <= 1.0):
            raise ValueError(f"expected max_speed in (0, 1], actual value: {max_speed!r}")
        self.obs_mode = obs_mode
        self.goal_radius = float(goal_radius)
        self.max_speed = float(max_speed)
        self.success_bonus = float(success_bonus)
        self.info_segmentation = bool(info_segmentation) or obs_mode == "pixels"
        layout = SceneLayout(arena_half=ARENA_HALF, n_free=1 + nd, pusher=True, goal=True,
                             image_size=image_size, free_damping=0.02)
        self._init_scene(layout, image_size, render_mode)
        m = self.model
        self._goal_geom = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "goal")
        m.geom_size[self._goal_geom, 0] = self.goal_radius
        m.geom_rgba[self._goal_geom, :3] = GOAL_COLOR
        self._pusher_body = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "pusher")
        self._pusher_geom = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "pusher_geom")
        jx = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "pusher_x")
        jy = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "pusher_y")
        self._pq = np.array([m.jnt_qposadr[jx], m.jnt_qposadr[jy]])
        self._pd = np.array([m.jnt_dofadr[jx], m.jnt_dofadr[jy]])
        m.actuator_ctrlrange[:] = (-self.max_speed, self.max_speed)
        self._pusher_radius = float(m.geom_size[self._pusher_geom, 0])
        m.geom_rgba[self._pusher_geom, :3] = PUSHER_COLOR
        self._geom_lut[self._pusher_geom] = PUSHER_ID
        for k in range(1 + nd):
            self._geom_lut[self._slots[k]["geom"]] = TARGET_ID + k
        self._set_camera(*look_at_pose((0.0, 0.0, 0.0), CAM_DISTANCE, CAM_AZIMUTH, CAM_ELEVATION))
        self._write_texture(self._floor_tex, texture_flat(FLOOR_TEX, FLOOR_TEX, (0.55, 0.55, 0.55)))
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        if obs_mode == "pixels":
            self.observation_space = self.pixel_space(image_size)
        else:
            dim = 14 + 5 * self.state_distractors
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self._goal = np.zeros(2)
        self._steps = 0
        n = 2 + nd
        self._info_shape = np.zeros(n, np.int32)
        self._info_size = np.zeros((n, 3))
        self._info_color = np.zeros((n, 3))

    # ------------------------------------------------------------------------------------------
    def _randomise(self, rng: np.random.Generator) -> None:
        m, nd = self.model, self.num_distractors
        cyl = SHAPES.index("cylinder")
        self._configure_slot(0, cyl, TARGET_EXTENT, TARGET_COLOR, density=400.0, friction=0.5)
        shapes, extents, colors = [cyl], [TARGET_EXTENT.copy()], [TARGET_COLOR]
        for k in range(1, 1 + nd):
            s = int(rng.integers(len(SHAPES)))
            e = _DISTRACTOR_EXTENT[s] * rng.uniform(0.85, 1.15)
            if SHAPES[s] == "sphere":
                e[:] = e[0]
            elif SHAPES[s] in ("cylinder", "capsule"):
                e[1] = e[0]
            e = shape_params(s, e)["aabb"]
            while True:
                c = random_color(rng, avoid_hue=0.0, gap=0.1)
                if min(abs(self._hue(c) - 0.36), 1 - abs(self._hue(c) - 0.36)) > 0.06:
                    break
            self._configure_slot(k, s, e, c, density=400.0, friction=0.5)
            shapes.append(s), extents.append(e), colors.append(c)
        for k, s in enumerate(self._slots):
            m.mat_specular[s["mat"]], m.mat_shininess[s["mat"]] = 0.3, 0.3
        self._finish_model_edits()

        mujoco.mj_resetData(m, self.data)
        # target near the centre, goal 12-30 cm away from it, then pusher and distractors
        target = rng.uniform(-0.15, 0.15, 2)
        while True:
            goal = rng.uniform(-(ARENA_HALF - 0.08), ARENA_HALF - 0.08, 2)
            if 0.12 < np.linalg.norm(goal - target) < 0.3:
                break
        r_t = float(np.linalg.norm(TARGET_EXTENT[:2]))
        fixed = [(target[0], target[1], r_t), (goal[0], goal[1], self.goal_radius)]
        radii = [self._pusher_radius] + [float(np.linalg.norm(e[:2])) for e in extents[1:]]
        xy = sample_positions(rng, radii, ARENA_HALF - 0.01, fixed=fixed, margin=0.02)
        self._goal = goal
        m.geom_pos[self._goal_geom, :2] = goal
        self.data.qpos[self._pq] = xy[0]
        positions = [target] + list(xy[1:])
        for k in range(1 + nd):
            s = self._slots[k]
            q = s["qpos"]
            self.data.qpos[q: q + 3] = (positions[k][0], positions[k][1], extents[k][2] + 0.002)
            self.data.qpos[q + 3: q + 7] = yaw_quat(rng.uniform(0, 2 * np.pi))
        n = 2 + nd
        self._info_shape[:] = [SHAPES.index("cylinder")] + shapes
        self._info_size[:] = [(self._pusher_radius,) * 3] + [np.asarray(e) for e in extents]
        self._info_color[:] = [PUSHER_COLOR] + [np.asarray(c) for c in colors]
        assert len(self._info_shape) == n

    @staticmethod
    def _hue(c) -> float:
        mx, mn = float(np.max(c)), float(np.min(c))
        if mx - mn < 1e-9:
            return 0.0
        r, g, b = c
        if mx == r:
            h = ((g - b) / (mx - mn)) % 6
        elif mx == g:
            h = (b - r) / (mx - mn) + 2
        else:
            h = (r - g) / (mx - mn) + 4
        return h / 6.0

    def _pusher_state(self):
        return self.data.qpos[self._pq].copy(), self.data.qvel[self._pd].copy()

    def _slot_xy(self, k: int):
        s = self._slots[k]
        return self.data.qpos[s["qpos"]: s["qpos"] + 2].copy(), self.data.qvel[s["dof"]: s["dof"] + 2].copy()

    def _state_obs(self) -> np.ndarray:
        pp, pv = self._pusher_state()
        tp, tv = self._slot_xy(0)
        rows = []
        for k in range(1, 1 + self.num_distractors):
            p, v = self._slot_xy(k)
            rows.append((float(np.linalg.norm(p - pp)), k, np.concatenate([p, v, [1.0]])))
        rows.sort(key=lambda r: (r[0], r[1]))
        dist = np.zeros((self.state_distractors, 5))
        for i, (_, _, row) in enumerate(rows[: self.state_distractors]):
            dist[i] = row
        if len(rows):
            dist[:, :2] /= STATE_POS_SCALE
            dist[:, 2:4] /= self.max_speed
        ps, vs = STATE_POS_SCALE, self.max_speed
        return np.concatenate([pp / ps, pv / vs, tp / ps, tv / vs, self._goal / ps, (tp - pp) / ps,
                               (self._goal - tp) / ps, dist.reshape(-1)]).astype(np.float32)

    def _objects(self) -> dict:
        n = 2 + self.num_distractors
        pos, quat, vel = np.zeros((n, 3)), np.zeros((n, 4)), np.zeros((n, 3))
        pos[0] = self.data.xpos[self._pusher_body]
        quat[0] = self.data.xquat[self._pusher_body]
        vel[0, :2] = self.data.qvel[self._pd]
        for k in range(1 + self.num_distractors):
            s = self._slots[k]
            pos[k + 1] = self.data.xpos[s["body"]]
            quat[k + 1] = self.data.xquat[s["body"]]
            vel[k + 1] = self.data.qvel[s["dof"]: s["dof"] + 3]
        return dict(id=np.arange(1, n + 1, dtype=np.int32), position=pos, quat=quat, velocity=vel,
                    color=self._info_color.copy(), shape=self._info_shape.copy(),
                    size=self._info_size.copy(), static=np.zeros(n, bool))

    def _distances(self):
        pp, _ = self._pusher_state()
        tp, _ = self._slot_xy(0)
        return float(np.linalg.norm(tp - self._goal)), float(np.linalg.norm(tp - pp))

    def _observe(self):
        mujoco.mj_forward(self.model, self.data)
        self._last_rgb = None
        d_tg, _ = self._distances()
        info = {"objects": self._objects(), "goal_position": self._goal.copy(),
                "goal_radius": self.goal_radius, "distance": d_tg, "is_success": d_tg < self.goal_radius}
        if self.obs_mode == "pixels" or self.info_segmentation:
            frame = self._render_frame(depth=self.obs_mode == "pixels")
            info["segmentation"] = frame["segmentation"]
        if self.obs_mode == "pixels":
            obs = {"rgb": frame["rgb"], "depth": frame["depth"]}
        else:
            obs = self._state_obs()
        return obs, info

    # ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._randomise(self.np_random)
        self._steps = 0
        out = self._observe()
        self._prev_dist = self._distances()
        return out

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        self.data.ctrl[:2] = a * self.max_speed
        for _ in range(self.frame_skip):
            mujoco.mj_step(self.model, self.data)
        self._steps += 1
        obs, info = self._observe()
        d_tg, d_pt = self._distances()
        success = d_tg < self.goal_radius
        prev_tg, prev_pt = self._prev_dist
        reward = (10.0 * (prev_tg - d_tg) + 2.0 * (prev_pt - d_pt)   # progress (potential differences)
                  - 0.5 * d_tg - 0.25 * d_pt                          # distance costs
                  + (self.success_bonus if success else 0.0))
        self._prev_dist = (d_tg, d_pt)
        truncated = (not success) and self._steps >= self.max_steps
        return obs, float(reward), bool(success), bool(truncated), info
