"""Tests for locis_rl.data: video recording to HDF5 and the VideoDataset reader."""
from __future__ import annotations

import os

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

import subprocess
import sys

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

from locis_rl.data import DatasetError, VideoDataset, describe
from locis_rl.data import generate as gen_mod
from locis_rl.data.generate import generate, noop_action, parse_kwargs, parse_value


# ------------------------------------------------------------------------------------------
# a tiny non-MuJoCo env (no pygame needed): vector obs, rgb through render(), random early ends
# ------------------------------------------------------------------------------------------
class _Blink(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode="rgb_array", end_prob=0.0):
        self.render_mode, self.end_prob = render_mode, end_prob
        self.observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(3)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self._t += 1
        done = bool(self.np_random.random() < self.end_prob)
        return np.zeros(2, np.float32), 1.0, done, False, {}

    def render(self):
        img = np.zeros((30, 40, 3), np.uint8)
        img[..., 0] = (self._t * 40) % 256
        return img


if "locis_test/Blink-v0" not in gym.registry:
    gym.register("locis_test/Blink-v0", entry_point=_Blink)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    # MuJoCo writes MUJOCO_LOG.TXT into the working directory on model warnings; keep it out of the repo.
    monkeypatch.chdir(tmp_path)


def _cli(tmp_path, *args):
    cmd = [sys.executable, "-m", "locis_rl.data.generate", "--no-progress", *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200)


def _load(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


# ------------------------------------------------------------------------------------------
def test_parse_kwargs():
    kw = parse_kwargs(["a=1", "b=2.5", "c=true", "d=False", "e=hello", "f=(1, 2)", "g='x y'", "h=none"])
    assert kw == {"a": 1, "b": 2.5, "c": True, "d": False, "e": "hello", "f": (1, 2), "g": "x y", "h": None}
    assert parse_value("[1,2]") == [1, 2]
    with pytest.raises(ValueError):
        parse_kwargs(["novalue"])


def test_noop_action():
    assert np.all(noop_action(gym.spaces.Box(-1, 1, (3,))) == 0)
    assert np.all(noop_action(gym.spaces.Box(1, 2, (2,))) == 1)  # zero clipped into the box
    assert noop_action(gym.spaces.Discrete(4, start=2)) == 2


def test_cli_mujoco_rgb_depth_segmentation(tmp_path):
    out = tmp_path / "reacher.h5"
    r = _cli(tmp_path, "--env", "Reacher-v5", "--episodes", "2", "--frames", "4", "--image-size", "32",
             "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert out.exists()
    d, a = _load(out)
    assert a["format"] == "locis-rl-video" and a["format_version"] == 1
    assert a["env_id"] == "Reacher-v5" and a["seed"] == 3 and a["frames"] == 4 and a["episodes"] == 2
    assert a["has_depth"] and a["has_segmentation"] and a["segmentation_source"] == "mujoco"
    assert list(a["image_size"]) == [32, 32] and a["created_with"].startswith("locis-rl")
    assert d["rgb"].shape == (2, 4, 32, 32, 3) and d["rgb"].dtype == np.uint8
    assert d["depth"].shape == (2, 4, 32, 32, 1) and d["depth"].dtype == np.float32
    assert np.isfinite(d["depth"]).all() and (d["depth"] > 0).all()
    seg = d["segmentation"]
    assert seg.shape == (2, 4, 32, 32)
    assert (seg == 0).any() and (seg > 0).any()  # background and at least one object
    n_obj = len(describe(out)["object_names"])
    assert n_obj == 2 and seg.max() <= n_obj  # Reacher: the arm (one object) and the target
    for ep in range(2):  # stable ids: the arm is id 1 in every frame
        for t in range(4):
            assert 1 in np.unique(seg[ep, t])
    assert d["actions"].shape == (2, 3, 2) and d["rewards"].shape == (2, 3)
    assert list(d["episode_seeds"]) == [3, 4]
    # foreground is nearer than the far plane background
    assert d["depth"][..., 0][seg > 0].max() < d["depth"][..., 0][seg == 0].max()


def test_rgb_depth_seg_share_the_env_camera():
    from locis_rl.data.mujoco_labels import MujocoLabelRenderer, camera_for_env, mujoco_handles

    env = gym.make("HalfCheetah-v5", render_mode="rgb_array", width=48, height=48)
    try:
        env.reset(seed=0)
        for _ in range(3):
            env.step(env.action_space.sample())
        ref = env.render()
        model, data = mujoco_handles(env)
        with MujocoLabelRenderer(model, data, 48, 48) as r:
            r.camera = camera_for_env(env, model, data)
            out = r.render()
        assert r.object_names == ["torso"]  # the whole cheetah is one object
        diff = np.abs(out["rgb"].astype(int) - ref.astype(int))
        assert diff.mean() < 1.0, "our renderer must see exactly what env.render() shows"
        fg = out["segmentation"] > 0
        assert fg.any() and (~fg).any()
        assert set(np.unique(out["segmentation"])) <= {0, 1}
    finally:
        env.close()


def test_workers_do_not_change_the_file(tmp_path):
    a = generate("Reacher-v5", 3, 3, tmp_path / "w1.h5", image_size=24, seed=7, workers=1, progress=False)
    b = generate("Reacher-v5", 3, 3, tmp_path / "w2.h5", image_size=24, seed=7, workers=2, progress=False)
    da, _ = _load(a)
    db, _ = _load(b)
    assert set(da) == set(db)
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)


def test_render_only_env_and_reroll(tmp_path):
    path = generate("locis_test/Blink-v0", 3, 6, tmp_path / "blink.h5", env_kwargs={"end_prob": 0.15},
                    image_size=16, seed=0, progress=False)
    d, a = _load(path)
    assert not a["has_depth"] and not a["has_segmentation"] and a["rgb_source"] == "render"
    assert set(d) >= {"rgb", "actions", "rewards"} and "depth" not in d and "segmentation" not in d
    assert d["rgb"].shape == (3, 6, 16, 16, 3)
    # exactly T frames per episode; the render counter proves no episode was cut short
    assert np.array_equal(d["rgb"][:, :, 0, 0, 0], np.tile((np.arange(6) * 40) % 256, (3, 1)))
    assert (d["rerolls"] > 0).any()
    rerolled = d["rerolls"] > 0
    assert (d["episode_seeds"][rerolled] != np.arange(3)[rerolled]).all()
    assert d["actions"].dtype == np.int64


def test_cartpole_through_render(tmp_path):
    pytest.importorskip("pygame")
    path = generate("CartPole-v1", 2, 4, tmp_path / "cp.h5", image_size=32, progress=False)
    d, a = _load(path)
    assert d["rgb"].shape == (2, 4, 32, 32, 3) and d["rgb"].std() > 0
    assert not a["has_depth"] and not a["has_segmentation"]


def test_dm_control_task_is_one_object(tmp_path):
    pytest.importorskip("dm_control.suite")
    path = generate("dmc:cartpole-balance", 1, 3, tmp_path / "dmc.h5", image_size=32, progress=False)
    d, _ = _load(path)
    info = describe(path)
    assert info["object_names"] == ["cart"]  # cart + pole subtree = one object; rails are world
    assert set(np.unique(d["segmentation"])) == {0, 1}
    assert np.isfinite(d["depth"]).all() and (d["depth"] > 0).all()


def test_env_own_labels_are_used(tmp_path):
    import envs  # noqa: F401

    if "locis/MultiObject-v0" not in gym.registry:
        pytest.skip("locis/MultiObject-v0 not available")
    path = generate("locis/MultiObject-v0", 1, 3, tmp_path / "mo.h5", image_size=32, progress=False)
    d, a = _load(path)
    assert a["segmentation_source"] == "env" and a["has_depth"] and a["rgb_source"] == "obs"
    assert d["rgb"].shape == (1, 3, 32, 32, 3) and d["segmentation"].shape == (1, 3, 32, 32)
    assert (d["segmentation"] == 0).any() and (d["segmentation"] > 0).any()
    assert np.isfinite(d["depth"]).all() and (d["depth"] > 0).all()


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ds") / "small.h5"
    return generate("Reacher-v5", 2, 5, p, image_size=24, seed=1, progress=False)


def test_video_dataset(small_file):
    ds = VideoDataset(small_file, seq_len=3, stride=1)
    assert len(ds) == 2 * 3
    item = ds[0]
    assert item["rgb"].shape == (3, 3, 24, 24) and item["rgb"].dtype == torch.float32
    assert 0.0 <= item["rgb"].min() and item["rgb"].max() <= 1.0
    assert item["depth"].shape == (3, 1, 24, 24) and item["depth"].dtype == torch.float32
    assert (item["depth"] > 0).all()
    assert item["segmentation"].shape == (3, 24, 24) and item["segmentation"].dtype == torch.int64
    assert item["actions"].shape == (2, 2)
    with h5py.File(small_file) as f:  # window contents and the raw metric depth
        np.testing.assert_allclose(ds[4]["depth"].numpy(), f["depth"][1, 1:4].transpose(0, 3, 1, 2))
    big = VideoDataset([small_file, small_file], seq_len=5, image_size=32)
    assert len(big) == 4
    it = big[3]
    assert it["rgb"].shape == (5, 3, 32, 32) and it["segmentation"].shape == (5, 32, 32)
    assert set(it["segmentation"].unique().tolist()) <= {0, 1, 2}
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    batch = next(iter(loader))
    assert batch["rgb"].shape == (3, 3, 3, 24, 24)
    with pytest.raises(DatasetError, match="fewer than seq_len"):
        VideoDataset(small_file, seq_len=6)


def test_dataset_errors_name_the_file(tmp_path, small_file):
    missing = tmp_path / "nope.h5"
    with pytest.raises(DatasetError, match="nope.h5"):
        VideoDataset(missing)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DatasetError, match=r"foreign\.h5.*missing attribute 'format'.*locis_rl\.data\.generate"):
        VideoDataset(foreign)
    with pytest.raises(DatasetError, match="foreign.h5"):
        describe(foreign)
    truncated = tmp_path / "trunc.h5"
    raw = open(small_file, "rb").read()
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="trunc.h5"):
        VideoDataset(truncated)
    assert isinstance(DatasetError("x"), ValueError)


def test_interrupted_run_leaves_no_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = gen_mod._Writer.write

    def failing_write(self, index, ep):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(self, index, ep)

    monkeypatch.setattr(gen_mod._Writer, "write", failing_write)
    out = tmp_path / "sub" / "broken.h5"
    with pytest.raises(KeyboardInterrupt):
        generate("locis_test/Blink-v0", 3, 2, out, image_size=8, progress=False)
    assert not out.exists()
    assert os.listdir(out.parent) == []  # the temporary file is gone too
