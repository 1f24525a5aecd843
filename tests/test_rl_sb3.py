"""Stable-Baselines3: LociSVecEnvWrapper (done rows, terminal_observation), SlotSetExtractor, PPO."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv

from locis_rl import LociSVecEnvWrapper, LociSWrapper
from locis_rl.rl.sb3 import SlotSetExtractor
from test_rl_common import FakePixelEnv, make_model

LENGTHS = (2, 3)
SEED = 11
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return make_model()


def _venv(model, **kwargs):
    venv = DummyVecEnv([lambda n=n: FakePixelEnv(episode_length=n) for n in LENGTHS])
    return LociSVecEnvWrapper(venv, model=model, device="cpu", **kwargs)


def test_sb3_check_env_on_wrapped_env(model):
    sb3_check_env(LociSWrapper(FakePixelEnv(), model=model, device="cpu"), warn=True)


def test_vec_wrapper_resets_done_rows_and_converts_terminal_obs(model):
    venv = _venv(model)
    venv.seed(SEED)
    obs = venv.reset()
    assert venv.observation_space.contains({k: v[0] for k, v in obs.items()})
    actions = np.zeros((len(LENGTHS), 2), np.float32)
    seen = [[{k: v[i] for k, v in obs.items()}] for i in range(len(LENGTHS))]
    terminals = [[] for _ in LENGTHS]
    for _ in range(4):
        obs, _, dones, infos = venv.step(actions)
        for i in range(len(LENGTHS)):
            seen[i].append({k: v[i] for k, v in obs.items()})
            if dones[i]:
                term = infos[i]["terminal_observation"]
                assert venv.observation_space.contains(term)
                terminals[i].append(term)
    # each row equals the same env run alone: terminal features = last step, then a fresh episode
    for i, n in enumerate(LENGTHS):
        single = LociSWrapper(FakePixelEnv(episode_length=n), model=model, device="cpu")
        expected, finals = [single.reset(seed=SEED + i)[0]], []
        for _ in range(4):
            o, _, term, trunc, _ = single.step(np.zeros(2, np.float32))
            if term or trunc:
                finals.append(o)
                o, _ = single.reset()
            expected.append(o)
        for a, b in zip(seen[i], expected):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], atol=ATOL)
        assert len(finals) == len(terminals[i])
        for a, b in zip(terminals[i], finals):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], atol=ATOL)


def test_slot_set_extractor_permutation_invariant_and_all_absent(model):
    space = LociSWrapper(FakePixelEnv(), model=model, device="cpu").observation_space
    extractor = SlotSetExtractor(space, features_dim=16, hidden=32)
    k, g = space["gestalt"].shape
    obs = {"gestalt": torch.rand(3, k, g), "position": torch.randn(3, k, 4), "depth": torch.rand(3, k, 1),
           "presence": (torch.rand(3, k) > 0.3).float()}
    obs["presence"][2] = 0.0                                   # a row with no object at all
    out = extractor(obs)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    perm = torch.randperm(k)
    out_perm = extractor({key: v[:, perm] for key, v in obs.items()})
    torch.testing.assert_close(out, out_perm, atol=1e-5, rtol=1e-5)
    # an absent slot's content does not matter, in an empty row or beside present slots
    changed = {key: v.clone() for key, v in obs.items()}
    changed["gestalt"][2] = 5.0
    obs["presence"][0, :2] = torch.tensor([1.0, 0.0])
    out = extractor(obs)
    changed = {key: v.clone() for key, v in obs.items()}
    changed["gestalt"][2] = 5.0
    changed["gestalt"][0, 1] += 3.0
    changed["position"][0, 1] -= 2.0
    changed["depth"][0, 1] += 1.0
    torch.testing.assert_close(extractor(changed), out)
    # a present slot's position does matter (the relations are inputs)
    moved = {key: v.clone() for key, v in obs.items()}
    moved["position"][0, 0, :2] += 0.5
    assert not torch.allclose(extractor(moved)[0], out[0])


def test_slot_set_encoder_tells_which_object_is_where_and_takes_any_batch_rank():
    # The same two positions held by two different objects, swapped between the rows.
    from locis_rl.rl.slot_set import SlotSetEncoder

    torch.manual_seed(0)
    encoder = SlotSetEncoder(4, features_dim=16, hidden=16)
    gestalt = torch.eye(4)[None, :2].expand(2, 2, 4)
    position = torch.zeros(2, 2, 4)
    position[0, :, :2] = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    position[1, :, :2] = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    out = encoder(gestalt, position, torch.zeros(2, 2, 1), torch.ones(2, 2))
    assert out.shape == (2, 16) and not torch.allclose(out[0], out[1])
    # leading batch dimensions of any rank
    assert encoder(gestalt[None], position[None], torch.zeros(1, 2, 2, 1), torch.ones(1, 2, 2)).shape == (1, 2, 16)


def test_slot_set_encoder_reads_relations_of_picked_slots_and_stays_finite_without_slots():
    from locis_rl.rl.slot_set import SlotSetEncoder

    torch.manual_seed(0)
    encoder = SlotSetEncoder(3, features_dim=8, hidden=8, queries=2)
    # Moving both objects by the same offset keeps their relation, moving one changes it: the
    # features differ in both cases (absolute positions are inputs too), and the gradients of a
    # batch that holds a row without any present slot are finite.
    gestalt = torch.eye(3)[None, :2].repeat(3, 1, 1)
    position = torch.zeros(3, 2, 4)
    position[1, :, :2] += 0.3
    position[2, 0, :2] += 0.3
    presence = torch.ones(3, 2)
    out = encoder(gestalt, position, torch.zeros(3, 2, 1), presence)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    presence[2] = 0.0
    encoder(gestalt, position, torch.zeros(3, 2, 1), presence).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="queries"):
        SlotSetEncoder(3, queries=0)


def test_vec_wrapper_num_slots_override_space(model, tmp_path):
    path = model.save_pretrained(tmp_path / "tiny.pt")
    k = model.config.num_slots + 2
    venv = _venv(path, num_slots=k, model_overrides={"assignment.warmup_inference": 1})
    assert venv.num_slots == k and venv.observation_space["gestalt"].shape == (k, venv.gestalt_dim)
    obs = venv.reset()
    assert obs["gestalt"].shape == (len(LENGTHS), k, venv.gestalt_dim)
    assert all(venv.observation_space.contains({key: v[i] for key, v in obs.items()})
               for i in range(len(LENGTHS)))


def test_slot_set_extractor_flat_box(model):
    env = LociSWrapper(FakePixelEnv(), model=model, device="cpu", flatten=True)
    with pytest.raises(ValueError, match="num_slots"):
        SlotSetExtractor(env.observation_space)
    extractor = SlotSetExtractor(env.observation_space, features_dim=8, num_slots=env.num_slots)
    obs, _ = env.reset(seed=0)
    assert extractor(torch.as_tensor(obs)[None]).shape == (1, 8)


def test_ppo_runs_with_slot_set_extractor(model):
    # 192 env steps (2 rollouts of 2 envs x 48 steps, 2 updates); episodes of 16 steps keep the
    # number of (costlier) warm-up resets low.
    venv = LociSVecEnvWrapper(DummyVecEnv([lambda: FakePixelEnv(episode_length=16)] * 2), model=model,
                              device="cpu")
    ppo = PPO("MultiInputPolicy", venv, n_steps=48, batch_size=48, n_epochs=2, seed=0, device="cpu",
              policy_kwargs=dict(features_extractor_class=SlotSetExtractor,
                                 features_extractor_kwargs=dict(features_dim=32, hidden=32),
                                 share_features_extractor=False))
    ppo.learn(total_timesteps=192)
    assert ppo.num_timesteps >= 192
    assert isinstance(ppo.policy.pi_features_extractor, SlotSetExtractor)
    assert ppo.policy.vf_features_extractor is not ppo.policy.pi_features_extractor
