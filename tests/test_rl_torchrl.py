"""TorchRL: LociSTransform specs, batched / partial resets, pixels layouts, collector end to end."""
from __future__ import annotations

import pytest
import torch

try:  # TorchRL >= 0.14 names the single-process collector `Collector`
    from torchrl.collectors import SyncDataCollector
except ImportError:
    from torchrl.collectors import Collector as SyncDataCollector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs import Compose, GymWrapper, ParallelEnv, SerialEnv, ToTensorImage, TransformedEnv
from torchrl.envs.utils import check_env_specs, step_mdp

from locis_rl.rl.torchrl import LociSTransform, make_slot_actor, make_slot_value
from test_rl_common import FakePixelEnv, make_model

LENGTHS = (2, 3)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return make_model()


def _serial(model, env_seed: int = 0, **kwargs):
    makers = [lambda n=n, i=i: GymWrapper(FakePixelEnv(episode_length=n, seed=env_seed + i))
              for i, n in enumerate(LENGTHS)]
    return TransformedEnv(SerialEnv(len(LENGTHS), makers), LociSTransform(model, device="cpu", **kwargs))


def test_single_env_specs_and_rollout(model):
    env = TransformedEnv(GymWrapper(FakePixelEnv(episode_length=20)), LociSTransform(model, device="cpu",
                                                                                  seed=0))
    check_env_specs(env)
    td = env.rollout(3)
    k = env.transform.perception.num_slots
    assert td["slot_gestalt"].shape[:2] == (3, k)
    assert td["next", "slot_presence"].shape == (3, k)
    assert ("locis", "hidden") in td.keys(True)


def test_transform_num_slots_override_specs(model, tmp_path):
    path = model.save_pretrained(tmp_path / "tiny.pt")
    k = model.config.num_slots + 2
    transform = LociSTransform(path, device="cpu", seed=0, num_slots=k,
                               model_overrides={"assignment.warmup_inference": 1})
    env = TransformedEnv(GymWrapper(FakePixelEnv(episode_length=20)), transform)
    g = transform.perception.gestalt_dim
    assert env.observation_spec["slot_gestalt"].shape == (k, g)
    assert env.observation_spec["slot_presence"].shape == (k,)
    assert env.observation_spec["locis", "position"].shape == (k, 4)
    td = env.reset()
    assert td["slot_gestalt"].shape == (k, g) and td["locis", "hidden"].shape[0] == k


def test_batched_env_specs(model):
    env = _serial(model, seed=0)
    check_env_specs(env)


def test_partial_reset_reinitialises_only_flagged_rows(model):
    env = _serial(model, seed=3)
    td = env.reset()
    td = env.rand_step(td)
    td = step_mdp(td)
    before = td.clone()
    td.set("_reset", torch.tensor([[True], [False]]))
    td = env.reset(td)
    for key in ("slot_gestalt", ("locis", "hidden"), ("locis", "frame_index")):
        torch.testing.assert_close(td[key][1], before[key][1])
    assert td["locis", "frame_index"][0].item() == 1 and before["locis", "frame_index"][0].item() == 2
    # the flagged row got a new state (new episode of its seed stream) and new features
    assert not torch.equal(td["slot_gestalt"][0], before["slot_gestalt"][0])


def test_batched_rows_match_single_envs(model):
    actions = torch.zeros(4, len(LENGTHS), 2)
    env = _serial(model, env_seed=50, seed=5)
    # explicit loop with the same zero actions, resetting done rows as a collector does
    td = env.reset()
    seq = [td["slot_gestalt"].clone()]
    for t in range(4):
        td.set("action", actions[t])
        td = env.step(td)
        seq.append(td["next", "slot_gestalt"].clone())
        done = td["next", "done"].clone()
        td = step_mdp(td)
        if done.any():
            td.set("_reset", done)
            td = env.reset(td)
            seq[-1] = torch.where(done[..., None], td["slot_gestalt"], seq[-1])
    for i, n in enumerate(LENGTHS):
        single = TransformedEnv(GymWrapper(FakePixelEnv(episode_length=n, seed=50 + i)),
                                LociSTransform(model, device="cpu", seed=5 + i))
        sd = single.reset()
        expected = [sd["slot_gestalt"]]
        for t in range(4):
            sd.set("action", actions[t, i])
            sd = single.step(sd)
            out = sd["next", "slot_gestalt"]
            done = sd["next", "done"].any()
            sd = step_mdp(sd)
            if done:
                sd = single.reset()
                out = sd["slot_gestalt"]
            expected.append(out)
        for t, (a, b) in enumerate(zip(seq, expected)):
            torch.testing.assert_close(a[i], b, atol=ATOL, rtol=0, msg=f"env {i} step {t}")


def test_pixels_key_uint8_hwc_and_float_chw(model):
    def base():
        return GymWrapper(FakePixelEnv(size=48, obs_kind="state", render_mode="rgb_array", seed=3),
                          from_pixels=True, pixels_only=False)

    hwc = TransformedEnv(base(), LociSTransform(model, device="cpu", seed=1))
    chw = TransformedEnv(base(), Compose(ToTensorImage(), LociSTransform(model, device="cpu", seed=1)))
    a = hwc.reset()
    b = chw.reset()
    assert hwc.transform.rgb_key == "pixels" and a["pixels"].dtype == torch.uint8
    assert b["pixels"].shape[-3] == 3 and b["pixels"].is_floating_point()
    perception = hwc.transform.perception
    assert a["slot_gestalt"].shape == (perception.num_slots, perception.gestalt_dim)
    torch.testing.assert_close(a["slot_gestalt"], b["slot_gestalt"], atol=1e-3, rtol=0)
    check_env_specs(chw)


def _fake_env(i: int = 0):
    return GymWrapper(FakePixelEnv(episode_length=3, seed=i))


def test_parallel_env_one_model_step_for_all_workers(model):
    env = TransformedEnv(ParallelEnv(2, _fake_env, mp_start_method="fork"),
                         LociSTransform(model, device="cpu", seed=0))
    try:
        td = env.rollout(2, break_when_any_done=False)
        assert td["next", "slot_gestalt"].shape[:2] == (2, 2)
        assert td["locis", "frame_index"][:, -1].tolist() == [2, 2]  # reset frame + one step
        check_env_specs(env)
    finally:
        env.close()


def test_reset_with_no_flagged_row_keeps_everything(model):
    env = _serial(model, seed=0)
    td = step_mdp(env.rand_step(env.reset()))
    before = td.clone()
    td.set("_reset", torch.zeros(2, 1, dtype=torch.bool))
    td = env.reset(td)
    torch.testing.assert_close(td["slot_gestalt"], before["slot_gestalt"])
    torch.testing.assert_close(td["locis", "hidden"], before["locis", "hidden"])


def test_replay_buffer_keeps_state(model):
    env = _serial(model, seed=0)
    data = env.rollout(2, break_when_any_done=False)
    rb = ReplayBuffer(storage=LazyTensorStorage(16))
    rb.extend(data.reshape(-1))
    sample = rb.sample(3)
    assert sample["locis", "hidden"].shape[0] == 3
    assert sample["next", "slot_gestalt"].shape[0] == 3


def test_no_image_key_errors(model):
    env = TransformedEnv(GymWrapper(FakePixelEnv(obs_kind="state")), LociSTransform(model, device="cpu"))
    with pytest.raises(KeyError, match="from_pixels=True"):
        env.observation_spec  # noqa: B018 - building the specs validates the input keys
    with pytest.raises(KeyError, match="from_pixels=True"):
        env.reset()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_collector_with_slot_set_actor_and_value(model):
    env = _serial(model, seed=0)
    actor = make_slot_actor(env, features_dim=32, hidden=32)
    value = make_slot_value(env, features_dim=32, hidden=32)
    collector = SyncDataCollector(env, actor, frames_per_batch=8, total_frames=16)
    batches = 0
    for batch in collector:
        batches += 1
        assert batch["action"].abs().max() <= 1.0
        assert torch.isfinite(batch["sample_log_prob"] if "sample_log_prob" in batch.keys()
                              else batch["action_log_prob"]).all()
        assert value(batch.clone())["state_value"].shape[-1] == 1
    collector.shutdown()
    assert batches == 2


def test_push_objects_gym_env(model):
    from torchrl.envs import GymEnv

    env = TransformedEnv(GymEnv("locis/PushObjects-v0", num_distractors=1, max_steps=3),
                         LociSTransform(model, device="cpu", seed=0))
    check_env_specs(env)
    assert env.transform.rgb_key == "rgb"
    env.close()
