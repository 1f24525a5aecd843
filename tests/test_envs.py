"""Tests of the MuJoCo scenes in `envs/` (headless EGL rendering)."""

import warnings

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the ids)
from envs.multi_object import MultiObjectEnv
from envs.push_objects import PUSHER_ID, STATE_POS_SCALE, TARGET_ID, PushObjectsEnv
from envs.scene import SHAPES


@pytest.fixture
def closing():
    made = []

    def make(env):
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


def _check(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env.unwrapped, skip_render_check=False)


def test_registered_ids(closing):
    env = closing(gym.make("locis/MultiObject-v0"))
    assert isinstance(env.unwrapped, MultiObjectEnv)
    env2 = closing(gym.make("locis/PushObjects-v0", obs_mode="state"))
    assert isinstance(env2.unwrapped, PushObjectsEnv)
    envs.register_envs()  # a second registration is a no-op
    assert isinstance(env.unwrapped.model, mujoco.MjModel)
    assert isinstance(env.unwrapped.data, mujoco.MjData)


@pytest.mark.parametrize("make", [
    lambda: MultiObjectEnv(level="a", render_mode="rgb_array"),
    lambda: PushObjectsEnv(render_mode="rgb_array"),
    lambda: PushObjectsEnv(obs_mode="state", num_distractors=2),
])
def test_check_env(make, closing):
    _check(closing(make()))


def test_spaces_and_info(closing):
    env = closing(MultiObjectEnv(level="b", render_mode="rgb_array"))
    obs, info = env.reset(seed=3)
    assert obs["rgb"].dtype == np.uint8 and obs["rgb"].shape == (64, 64, 3)
    assert obs["depth"].dtype == np.float32 and obs["depth"].shape == (64, 64, 1)
    assert env.observation_space.contains(obs)
    assert 0.3 < obs["depth"].min() and obs["depth"].max() < 10.0  # metres
    seg = info["segmentation"]
    assert seg.dtype == np.int32 and seg.shape == (64, 64)
    objs = info["objects"]
    n = len(objs["id"])
    assert 3 <= n <= 6
    assert objs["position"].shape == (n, 3) and objs["color"].shape == (n, 3)
    assert objs["size"].shape == (n, 3) and objs["shape"].shape == (n,)
    assert ((objs["color"] >= 0) & (objs["color"] <= 1)).all()
    assert ((objs["shape"] >= 0) & (objs["shape"] < len(SHAPES))).all()
    np.testing.assert_array_equal(objs["id"], np.arange(1, n + 1))
    frame = env.render()
    np.testing.assert_array_equal(frame, obs["rgb"])


def test_seeded_reproducibility(closing):
    a = closing(MultiObjectEnv(level="c"))
    b = closing(MultiObjectEnv(level="c"))
    oa, ia = a.reset(seed=11)
    ob, ib = b.reset(seed=11)
    a.reset(seed=5)  # a different episode in between must not leak
    oa, ia = a.reset(seed=11)
    for _ in range(3):
        np.testing.assert_array_equal(oa["rgb"], ob["rgb"])
        np.testing.assert_array_equal(oa["depth"], ob["depth"])
        np.testing.assert_array_equal(ia["segmentation"], ib["segmentation"])
        oa, *_, ia = a.step(0)
        ob, *_, ib = b.step(0)
    oc, _ = a.reset(seed=12)
    assert not np.array_equal(oc["rgb"], ob["rgb"])


def test_segmentation_ids_stable(closing):
    env = closing(MultiObjectEnv(level="a", num_objects=(5, 5)))
    obs, info = env.reset(seed=0)
    ids = info["objects"]["id"]
    colors = info["objects"]["color"].copy()
    seen = set()
    for t in range(8):
        seg = info["segmentation"]
        present = set(np.unique(seg).tolist()) - {0}
        assert present <= set(ids.tolist())
        seen |= present
        np.testing.assert_array_equal(info["objects"]["id"], ids)
        np.testing.assert_array_equal(info["objects"]["color"], colors)
        # each object's pixels are coloured like the object (roughly: its hue dominates)
        for i in present:
            mean = obs["rgb"][seg == i].mean(0) / 255.0
            c = colors[i - 1]
            assert np.argmax(mean) == np.argmax(c) or np.ptp(c) < 0.25
        obs, _, _, _, info = env.step(0)
    assert len(seen) >= 4


def test_objects_move(closing):
    env = closing(MultiObjectEnv(level="a"))
    _, info = env.reset(seed=1)
    p0 = info["objects"]["position"].copy()
    for _ in range(5):
        _, _, _, _, info = env.step(0)
    assert np.abs(info["objects"]["position"] - p0).max() > 0.05
    for _ in range(20):
        _, _, _, _, info = env.step(0)
    pos = info["objects"]["position"]
    assert (np.abs(pos[:, :2]) < 0.6).all() and (pos[:, 2] > -0.01).all()


@pytest.mark.parametrize("level", list("abcde"))
def test_levels(level, closing):
    env = closing(MultiObjectEnv(level=level))
    obs, info = env.reset(seed=2)
    obs2, *_, info2 = env.step(0)
    assert env.observation_space.contains(obs2)
    n = len(info["objects"]["id"])
    if level in "de":
        assert 8 <= n <= 15 and info["objects"]["static"].sum() >= n // 2
    if level == "e":
        assert not np.allclose(info["camera"]["position"], info2["camera"]["position"])
    else:
        np.testing.assert_allclose(info["camera"]["position"], info2["camera"]["position"])


def test_image_size_128(closing):
    env = closing(MultiObjectEnv(level="a", image_size=128))
    obs, info = env.reset(seed=0)
    assert obs["rgb"].shape == (128, 128, 3) and obs["depth"].shape == (128, 128, 1)
    assert info["segmentation"].shape == (128, 128)
    env2 = closing(PushObjectsEnv(image_size=128))
    obs, info = env2.reset(seed=0)
    assert obs["rgb"].shape == (128, 128, 3)


def test_push_info_and_state(closing):
    env = closing(PushObjectsEnv(num_distractors=4, state_distractors=3, obs_mode="state",
                                 info_segmentation=True))
    obs, info = env.reset(seed=0)
    assert obs.shape == (14 + 15,) and obs.dtype == np.float32
    objs = info["objects"]
    np.testing.assert_array_equal(objs["id"], np.arange(1, 7))
    assert objs["shape"][0] == SHAPES.index("cylinder")
    np.testing.assert_allclose(objs["color"][TARGET_ID - 1], [0.9, 0.08, 0.08])
    np.testing.assert_allclose(obs[0:2] * STATE_POS_SCALE, objs["position"][PUSHER_ID - 1, :2], atol=1e-6)
    np.testing.assert_allclose(obs[4:6] * STATE_POS_SCALE, objs["position"][TARGET_ID - 1, :2], atol=1e-6)
    assert {PUSHER_ID, TARGET_ID} <= set(np.unique(info["segmentation"]).tolist())
    # size of the state does not depend on num_distractors
    for nd in (0, 7):
        e = closing(PushObjectsEnv(num_distractors=nd, obs_mode="state"))
        o, _ = e.reset(seed=0)
        assert o.shape == obs.shape
    # the pusher moves with the action
    p0 = obs[0:2].copy()
    for _ in range(5):
        obs, *_ = env.step(np.array([1.0, 0.0], np.float32))
    assert (obs[0] - p0[0]) * STATE_POS_SCALE > 0.05 or obs[0] * STATE_POS_SCALE > 0.2


def test_push_success_terminates(closing):
    env = closing(PushObjectsEnv(num_distractors=2))
    env.reset(seed=4)
    u = env.unwrapped
    q = u._slots[0]["qpos"]
    u.data.qpos[q: q + 2] = u._goal
    u.data.qvel[:] = 0
    mujoco.mj_forward(u.model, u.data)
    _, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert terminated and not truncated and info["is_success"]
    assert reward > 5.0


def test_push_truncates(closing):
    env = closing(PushObjectsEnv(obs_mode="state", max_steps=7))
    env.reset(seed=0)
    for t in range(7):
        _, _, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert not terminated
        assert truncated == (t == 6)


@pytest.mark.parametrize("make, match", [
    (lambda: MultiObjectEnv(level="z"), "level"),
    (lambda: MultiObjectEnv(image_size=60), "image_size"),
    (lambda: MultiObjectEnv(image_size=0), "image_size"),
    (lambda: MultiObjectEnv(num_objects=(5, 3)), "num_objects"),
    (lambda: MultiObjectEnv(num_objects=(0, 3)), "num_objects"),
    (lambda: MultiObjectEnv(num_objects=4), "num_objects"),
    (lambda: MultiObjectEnv(frame_skip=0), "frame_skip"),
    (lambda: PushObjectsEnv(obs_mode="rgb"), "obs_mode"),
    (lambda: PushObjectsEnv(num_distractors=-1), "num_distractors"),
    (lambda: PushObjectsEnv(image_size=100), "image_size"),
])
def test_bad_kwargs(make, match):
    with pytest.raises(ValueError, match=f"expected {match}.*actual value"):
        make()


def test_rendering_first_then_loading_the_model_does_not_crash(tmp_path):
    """Mesa's software EGL and Triton each bring an LLVM; rendering before torch loaded Triton
    (``import tensordict`` does) killed the process with a segmentation fault. A fresh interpreter
    renders a frame first, then imports the model and steps it."""
    import os
    import subprocess
    import sys

    script = (
        "import gymnasium as gym, envs\n"
        "env = gym.make('locis/MultiObject-v0', image_size=64)\n"
        "obs, _ = env.reset(seed=0)\n"
        "import torch\n"
        "from locis_rl.model import LociS\n"
        "model = LociS('tiny').eval()\n"
        "rgb = torch.as_tensor(obs['rgb']).permute(2, 0, 1)[None].float() / 255\n"
        "out, state = model.step(rgb, None, model.init_state(1))\n"
        "print('stepped', tuple(out['masks'].shape))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "stepped (1, 7, 64, 64)" in proc.stdout
