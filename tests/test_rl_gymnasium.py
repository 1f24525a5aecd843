"""LociSWrapper / LociSVectorWrapper: spaces, sources of frames, errors, autoreset modes, isolation."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from locis_rl import LociSVectorWrapper, LociSWrapper
from test_rl_common import IMAGE, FakePixelEnv, make_model

LENGTHS = (2, 3)          # different episode lengths: rows reset at different steps
STEPS = 5
SEED = 7
ZERO = np.zeros(2, np.float32)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_wrapper_dict_obs_space_and_render(model):
    env = LociSWrapper(FakePixelEnv(), model=model, device="cpu")
    k, g = env.num_slots, env.gestalt_dim
    assert set(env.observation_space.spaces) == {"gestalt", "position", "depth", "presence"}
    assert env.observation_space["gestalt"].shape == (k, g)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(ZERO)
    assert env.observation_space.contains(obs)
    frame = env.render()
    assert frame.shape == (IMAGE, IMAGE, 3) and frame.dtype == np.uint8


def test_wrappers_with_num_slots_have_the_matching_space(model, tmp_path):
    path = model.save_pretrained(tmp_path / "tiny.pt")
    k = model.config.num_slots + 2
    env = LociSWrapper(FakePixelEnv(), model=path, device="cpu", num_slots=k,
                       model_overrides={"assignment.warmup_inference": 1})
    assert env.num_slots == k and env.observation_space["gestalt"].shape == (k, env.gestalt_dim)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs["presence"].shape == (k,)
    venv = SyncVectorEnv([lambda: FakePixelEnv() for _ in range(2)])
    vec = LociSVectorWrapper(venv, model=path, device="cpu", flatten=True, num_slots=k,
                             model_overrides={"assignment.warmup_inference": 1})
    assert vec.single_observation_space.shape == (k * (vec.gestalt_dim + 6),)
    assert vec.observation_space.shape == (2, k * (vec.gestalt_dim + 6))
    obs, _ = vec.reset(seed=0)
    assert vec.observation_space.contains(obs)


def test_wrapper_flatten_and_image_obs(model):
    env = LociSWrapper(FakePixelEnv(obs_kind="image"), model=model, device="cpu", flatten=True)
    assert isinstance(env.observation_space, gym.spaces.Box)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (env.num_slots * (env.gestalt_dim + 6),) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)


def test_wrapper_frames_from_render_and_resize(model):
    env = LociSWrapper(FakePixelEnv(size=48, obs_kind="state", render_mode="rgb_array"), model=model,
                       device="cpu")
    assert env.source[0] == "render"
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert env.render().shape == (IMAGE, IMAGE, 3)  # what the model sees: resized to its input


def test_wrapper_gymnasium_check_env(model):
    gym_check_env(LociSWrapper(FakePixelEnv(), model=model, device="cpu"), skip_render_check=True)


def test_wrapper_seeded_reset_reproduces(model):
    env = LociSWrapper(FakePixelEnv(), model=model, device="cpu")
    a, _ = env.reset(seed=3)
    a1, *_ = env.step(ZERO)
    b, _ = env.reset(seed=3)
    b1, *_ = env.step(ZERO)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a1[key], b1[key])


def test_no_image_env_errors_with_advice(model):
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        LociSWrapper(FakePixelEnv(obs_kind="state"), model=model, device="cpu")


def test_wrong_channels_errors(model):
    env = FakePixelEnv(obs_kind="image")
    env.observation_space = gym.spaces.Box(0, 255, (IMAGE, IMAGE, 4), np.uint8)
    with pytest.raises(ValueError, match="3 channels"):
        LociSWrapper(env, model=model, device="cpu")


def test_depth_model_without_depth_errors():
    depth_model = make_model(use_depth=True)
    with pytest.raises(ValueError, match="depth"):
        LociSWrapper(FakePixelEnv(obs_kind="image"), model=depth_model, device="cpu")
    env = LociSWrapper(FakePixelEnv(), model=depth_model, device="cpu")   # Dict with depth: fine
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_missing_default_checkpoint_is_clear(monkeypatch, tmp_path):
    import locis_rl.model.locis as locis

    monkeypatch.setattr(locis, "DEFAULT_CHECKPOINT", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="LociS\\('tiny'\\)"):
        LociSWrapper(FakePixelEnv(), model="default", device="cpu")


def test_unknown_mode_errors_at_construction(model):
    with pytest.raises(ValueError, match=r"mode: expected one of \('rnd', 'reg', 'seg'\).*'segment'"):
        LociSWrapper(FakePixelEnv(), model=model, device="cpu", mode="segment")


@pytest.mark.parametrize("device, error", [
    ("gpu", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:64", "CUDA device"),   # no machine of ours has 65 GPUs; without CUDA: "sees no CUDA device"
])
def test_unusable_device_errors_with_advice(model, device, error):
    with pytest.raises(ValueError, match=error):
        LociSWrapper(FakePixelEnv(), model=model, device=device)


def test_cuda_without_a_gpu_says_to_use_auto(model, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA device.*device='auto'"):
        LociSWrapper(FakePixelEnv(), model=model, device="cuda")


def test_nan_frames_error(model):
    env = FakePixelEnv(obs_kind="image")
    env.observation_space = gym.spaces.Box(0.0, 1.0, (IMAGE, IMAGE, 3), np.float32)
    wrapped = LociSWrapper(env, model=model, device="cpu")
    env._image = lambda: np.full((IMAGE, IMAGE, 3), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        wrapped.reset(seed=0)


# ---- vector envs: every autoreset mode against the same envs run one by one ------------------

def _single_runs(model, mode: AutoresetMode) -> list[list[dict]]:
    """Per env: features after each vector step, as the one-env wrapper produces them."""
    runs = []
    for i, length in enumerate(LENGTHS):
        env = LociSWrapper(FakePixelEnv(episode_length=length), model=model, device="cpu")
        obs, _ = env.reset(seed=SEED + i)
        seq, finals, done = [obs], [], False
        for _ in range(STEPS):
            if mode == AutoresetMode.NEXT_STEP and done:
                obs, _ = env.reset()
                done = False
            else:
                obs, _, term, trunc, _ = env.step(ZERO)
                done = term or trunc
                if mode == AutoresetMode.SAME_STEP and done:
                    finals.append(obs)
                    obs, _ = env.reset()
            seq.append(obs)
        runs.append((seq, finals))
    return runs


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_matches_single_envs(model, mode):
    venv = SyncVectorEnv([lambda n=n: FakePixelEnv(episode_length=n) for n in LENGTHS], autoreset_mode=mode)
    envs = LociSVectorWrapper(venv, model=model, device="cpu")
    obs, _ = envs.reset(seed=SEED)
    seqs = [[{k: v[i] for k, v in obs.items()}] for i in range(len(LENGTHS))]
    finals = [[] for _ in LENGTHS]
    for _ in range(STEPS):
        obs, _, term, trunc, info = envs.step(np.zeros((len(LENGTHS), 2), np.float32))
        assert envs.observation_space.contains(obs)
        for i in range(len(LENGTHS)):
            seqs[i].append({k: v[i] for k, v in obs.items()})
            if mode == AutoresetMode.SAME_STEP and (term[i] or trunc[i]):
                assert info["_final_obs"][i]
                finals[i].append({k: info["final_obs"][k][i] for k in obs})
    for i, (single_seq, single_finals) in enumerate(_single_runs(model, mode)):
        for t, (a, b) in enumerate(zip(seqs[i], single_seq)):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], atol=ATOL, err_msg=f"env {i} step {t} {key}")
        assert len(finals[i]) == len(single_finals)
        for a, b in zip(finals[i], single_finals):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], atol=ATOL)


def test_vector_disabled_partial_reset(model):
    venv = SyncVectorEnv([lambda n=n: FakePixelEnv(episode_length=n) for n in LENGTHS],
                         autoreset_mode=AutoresetMode.DISABLED)
    envs = LociSVectorWrapper(venv, model=model, device="cpu", flatten=True)
    envs.reset(seed=SEED)
    actions = np.zeros((len(LENGTHS), 2), np.float32)
    for _ in range(LENGTHS[0]):
        obs, _, term, trunc, _ = envs.step(actions)
    done = term | trunc
    assert done.tolist() == [True, False]
    state_before = envs.perception.state[1:].clone()
    obs2, _ = envs.reset(options={"reset_mask": done})
    np.testing.assert_array_equal(obs2[1:], obs[1:])             # other rows: unchanged
    for key, value in envs.perception.state[1:].items(True, True):
        np.testing.assert_array_equal(value.numpy(), state_before.get(key).numpy())
    # the reset row equals a fresh one-env run of the same (env, seed stream, episode)
    single = LociSWrapper(FakePixelEnv(episode_length=LENGTHS[0]), model=model, device="cpu", flatten=True)
    single.reset(seed=SEED)
    for _ in range(LENGTHS[0]):
        single.step(ZERO)
    first, _ = single.reset()
    np.testing.assert_allclose(obs2[0], first, atol=ATOL)


@pytest.mark.parametrize("mask, error", [
    ([True, False, False], TypeError),
    (np.array([True, False]), ValueError),
    (np.array([1, 0, 0]), ValueError),
    (np.zeros(3, bool), ValueError),
])
def test_vector_reset_mask_validation(model, mask, error):
    venv = SyncVectorEnv([lambda: FakePixelEnv() for _ in range(3)])
    envs = LociSVectorWrapper(venv, model=model, device="cpu")
    with pytest.raises(error, match="reset_mask"):
        envs.reset(options={"reset_mask": mask})


def test_push_objects_env(model):
    env = LociSWrapper(gym.make("locis/PushObjects-v0", num_distractors=2, max_steps=3), model=model,
                       device="cpu")
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    env.close()


def test_reacher_frames_from_render(model):
    pytest.importorskip("mujoco")
    env = LociSWrapper(gym.make("Reacher-v5", render_mode="rgb_array", width=96, height=96), model=model,
                       device="cpu")
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    assert env.render().shape == (IMAGE, IMAGE, 3)
    env.close()


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_frames_from_render(model, mode):
    venv = SyncVectorEnv([lambda: FakePixelEnv(obs_kind="state", render_mode="rgb_array", episode_length=2)
                          for _ in range(2)], autoreset_mode=mode)
    envs = LociSVectorWrapper(venv, model=model, device="cpu")
    assert envs.source[0] == "render"
    envs.reset(seed=0)
    for _ in range(3):
        obs, *_ = envs.step(np.zeros((2, 2), np.float32))
        assert envs.observation_space.contains(obs)
    assert len(envs.render()) == 2


def test_savi_runs_through_the_wrapper_from_a_checkpoint(tmp_path):
    # The SAVi baseline has the same explicit-state interface: the wrapper loads it from its
    # checkpoint file and emits the same features (its slot vector as the Gestalt code).
    import torch

    from locis_rl.savi import SAVi

    torch.manual_seed(0)
    path = SAVi("savi-tiny").save_pretrained(tmp_path / "savi.pt")
    env = LociSWrapper(FakePixelEnv(), model=str(path), device="cpu")  # default mode="seg" is Loci-s's
    assert env.observation_space["gestalt"].shape == (env.num_slots, SAVi("savi-tiny").config.slot_dim)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(ZERO)
    assert env.observation_space.contains(obs)
