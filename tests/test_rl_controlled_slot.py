"""Controlled-slot cue: the tracker's fit, row independence, action encodings, the SB3 wrapper."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from locis_rl.rl.controlled_slot import (ControlledSlotConfig, ControlledSlotTracker, action_feature_dim,
                                         action_features)
from locis_rl.rl.sb3 import ControlledSlotVecEnv, SlotSetExtractor

K, G = 4, 3
# image axes of a camera turned and flipped against the action's: the fit must not care
CAMERA = np.array([[0.0, -0.04], [-0.03, 0.01]])


def _frames(steps: int, rows: int, seed: int = 0):
    """Actions ``[T, N, 2]`` and slot positions ``[T + 1, N, K, 2]``: slot 0 is moved by the action
    through CAMERA, slot 1 jitters at random, slot 2 rests, slot 3 moves with the action but is absent."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, rows, 2))
    xy = np.zeros((steps + 1, rows, K, 2))
    xy[0] = rng.uniform(-0.5, 0.5, (rows, K, 2))
    for t in range(steps):
        xy[t + 1] = xy[t]
        xy[t + 1, :, 0] += actions[t] @ CAMERA.T
        xy[t + 1, :, 1] += rng.normal(0, 0.02, (rows, 2))
        xy[t + 1, :, 3] += actions[t] @ CAMERA.T
    presence = np.tile([1.0, 1.0, 1.0, 0.0], (rows, 1))
    return actions, xy, presence


def test_tracker_marks_the_slot_the_actions_move_through_any_linear_camera():
    tracker = ControlledSlotTracker()
    actions, xy, presence = _frames(30, rows=3)
    state = tracker.initial_state(torch.as_tensor(xy[0]), action_dim=2)
    for t in range(30):
        explained, controlled, state = tracker.step(state, torch.as_tensor(actions[t]),
                                                    torch.as_tensor(xy[t + 1]), torch.as_tensor(presence))
        if t >= 3:
            assert (controlled[:, 0] == 1).all() and controlled[:, 1:].sum() == 0, t
    assert (explained[:, 0] > 0.95).all()
    assert (explained[:, 1] < 0.5).all()            # random jitter: only the small-sample fit
    assert (explained[:, 2] < 1e-6).all()           # at rest
    assert (explained[:, 3] > 0.95).all()           # explained, but absent: never marked


def test_tracker_rows_are_independent_and_reset_rows_restarts_only_the_flagged_ones():
    tracker = ControlledSlotTracker(ControlledSlotConfig(decay=0.8))
    actions, xy, presence = _frames(12, rows=3, seed=1)
    batched = tracker.initial_state(torch.as_tensor(xy[0]), 2)
    single = [tracker.initial_state(torch.as_tensor(xy[0, i:i + 1]), 2) for i in range(3)]
    for t in range(12):
        if t == 6:        # row 1's episode ends: a fresh start at the current positions
            batched = tracker.reset_rows(batched, torch.tensor([False, True, False]), torch.as_tensor(xy[t]))
            single[1] = tracker.initial_state(torch.as_tensor(xy[t, 1:2]), 2)
        got, _, batched = tracker.step(batched, torch.as_tensor(actions[t]), torch.as_tensor(xy[t + 1]),
                                       torch.as_tensor(presence))
        for i in range(3):
            want, _, single[i] = tracker.step(single[i], torch.as_tensor(actions[t, i:i + 1]),
                                              torch.as_tensor(xy[t + 1, i:i + 1]),
                                              torch.as_tensor(presence[i:i + 1]))
            torch.testing.assert_close(got[i:i + 1], want, rtol=0, atol=1e-6)


def test_action_features_encodings_and_errors():
    np.testing.assert_array_equal(action_features(gym.spaces.Discrete(3, start=1), np.array([1, 3])),
                                  [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(action_features(gym.spaces.MultiDiscrete([2, 3]), np.array([[1, 2]])),
                                  [[0, 1, 0, 0, 1]])
    assert action_features(gym.spaces.Box(-1, 1, (2, 2)), np.zeros((5, 2, 2))).shape == (5, 4)
    np.testing.assert_array_equal(action_features(gym.spaces.MultiDiscrete([2, 3], start=[1, -1]),
                                                  np.array([[2, -1]])), [[0, 1, 1, 0, 0]])
    assert [action_feature_dim(space) for space in (gym.spaces.Box(-1, 1, (2, 3)), gym.spaces.Discrete(4),
                                                     gym.spaces.MultiDiscrete([2, 3]), gym.spaces.MultiBinary(5))
            ] == [6, 4, 5, 5]
    with pytest.raises(TypeError, match="action space"):
        action_features(gym.spaces.Dict({"a": gym.spaces.Discrete(2)}), np.zeros(1))
    with pytest.raises(ValueError, match="decay"):
        ControlledSlotConfig(decay=1.0)


class SlotFeatureEnv(gym.Env):
    """Slot features of a toy scene: slot 2 is the agent's body (moves with the action), the rest rest."""

    def __init__(self, episode_length: int = 6):
        self.episode_length = episode_length
        self.observation_space = gym.spaces.Dict({
            "gestalt": gym.spaces.Box(0, 1, (K, G), np.float32),
            "position": gym.spaces.Box(-np.inf, np.inf, (K, 4), np.float32),
            "depth": gym.spaces.Box(-np.inf, np.inf, (K, 1), np.float32),
            "presence": gym.spaces.Box(0, 1, (K,), np.float32)})
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def _obs(self):
        position = np.zeros((K, 4), np.float32)
        position[:, :2] = self.xy
        return {"gestalt": np.full((K, G), 0.5, np.float32), "position": position,
                "depth": np.zeros((K, 1), np.float32), "presence": np.ones(K, np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.xy, self.t = self.np_random.uniform(-0.5, 0.5, (K, 2)), 0
        return self._obs(), {}

    def step(self, action):
        self.xy[2] += np.asarray(action) @ CAMERA.T
        self.t += 1
        return self._obs(), 0.0, False, self.t >= self.episode_length, {}


def test_vec_env_wrapper_marks_the_body_resets_done_rows_and_fills_terminal_observation():
    inner = DummyVecEnv([lambda: SlotFeatureEnv(6), lambda: SlotFeatureEnv(9)])
    inner.action_space.seed(5)
    venv = ControlledSlotVecEnv(inner)
    untouched = gym.spaces.Box(-1, 1, (2,), np.float32, seed=5)
    np.testing.assert_array_equal(inner.action_space.sample(), untouched.sample())   # wrapping drew nothing
    assert venv.observation_space["controlled"].shape == (K,)
    obs = venv.reset()
    np.testing.assert_array_equal(obs["controlled"], 0)              # no action yet
    rng = np.random.default_rng(0)
    for t in range(1, 9):
        obs, _, dones, infos = venv.step(rng.uniform(-1, 1, (2, 2)).astype(np.float32))
        assert venv.observation_space.contains({k: v[0] for k, v in obs.items()})
        if t == 6:                    # row 0 ended: its terminal frame is marked, its new episode not yet
            assert dones.tolist() == [True, False]
            np.testing.assert_array_equal(infos[0]["terminal_observation"]["controlled"], [0, 0, 1, 0])
            np.testing.assert_array_equal(obs["controlled"][0], 0)
            np.testing.assert_array_equal(obs["controlled"][1], [0, 0, 1, 0])
        elif t >= 2:
            np.testing.assert_array_equal(obs["controlled"][1], [0, 0, 1, 0])
        if t >= 8:                    # row 0 marked again two frames into its next episode
            np.testing.assert_array_equal(obs["controlled"][0], [0, 0, 1, 0])


def test_vec_env_wrapper_rejects_observations_without_slot_features():
    box = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match="slot-feature Dict"):
        ControlledSlotVecEnv(DummyVecEnv([lambda: box]))
    once = ControlledSlotVecEnv(DummyVecEnv([SlotFeatureEnv]))
    with pytest.raises(ValueError, match="already"):
        ControlledSlotVecEnv(once)


def test_slot_set_extractor_reads_the_cue_and_ppo_runs_with_it():
    venv = ControlledSlotVecEnv(DummyVecEnv([SlotFeatureEnv, SlotFeatureEnv]))
    extractor = SlotSetExtractor(venv.observation_space, features_dim=16)
    assert extractor.with_controlled and extractor.encoder.gestalt_dim == G + 1
    obs = {k: torch.as_tensor(v) for k, v in venv.reset().items()}
    marked = dict(obs, controlled=torch.tensor([[0.0, 0, 1, 0]] * 2))
    assert not torch.allclose(extractor(obs), extractor(marked))   # the keys see it
    agent = PPO("MultiInputPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu",
                policy_kwargs=dict(features_extractor_class=SlotSetExtractor,
                                   features_extractor_kwargs=dict(features_dim=16),
                                   share_features_extractor=False))
    agent.learn(32)
    assert agent.num_timesteps >= 32
