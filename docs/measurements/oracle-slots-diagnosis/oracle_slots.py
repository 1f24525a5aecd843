"""PPO + slot-set encoders on ground-truth 'oracle slots' of PushObjects (diagnostic)."""
import sys, json, time
import envs  # noqa
import numpy as np, torch, gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnvWrapper
from locis_rl.rl.compare import PPOConfig, evaluate_success, EVAL_SEED

K, G = 8, 8
import os
VEL = os.environ.get('VEL') == '1'
extractor = sys.argv[1] if len(sys.argv) > 1 else "set"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
noise = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

class OracleSlots(VecEnvWrapper):
    def __init__(self, venv, seed=0):
        space = gym.spaces.Dict({"gestalt": gym.spaces.Box(-np.inf, np.inf, (K, G), np.float32),
                                 "position": gym.spaces.Box(-np.inf, np.inf, (K, 4), np.float32),
                                 "depth": gym.spaces.Box(-np.inf, np.inf, (K, 1), np.float32),
                                 "presence": gym.spaces.Box(0, 1, (K,), np.float32)})
        super().__init__(venv, observation_space=space)
        self.rng = np.random.default_rng(seed)
        self.perm = np.stack([self.rng.permutation(K) for _ in range(venv.num_envs)])
    def convert(self, s):
        return self.convert_rows(s, self.perm)
    def convert_rows(self, s, perm):
        n = s.shape[0]
        pos = np.zeros((n, K, 4), np.float32); ges = np.zeros((n, K, G), np.float32)
        pres = np.zeros((n, K), np.float32)
        objs = [s[:, 0:2], s[:, 4:6], s[:, 8:10]] + [s[:, 14 + 5 * j:16 + 5 * j] for j in range(3)]
        for j, xy in enumerate(objs):
            pos[:, j, :2] = xy + noise * self.rng.standard_normal(xy.shape)
            if VEL and j != 2:
                c = {0: 2, 1: 6}.get(j, 14 + 5 * (j - 3) + 2)
                pos[:, j, 2:4] = s[:, c:c + 2]
            ges[:, j, min(j, 3)] = 1.0
            pres[:, j] = 1.0 if j < 3 else s[:, 18 + 5 * (j - 3)]
        idx = perm
        take = lambda a: np.take_along_axis(a, idx.reshape(n, K, *([1] * (a.ndim - 2))), 1)
        return {"gestalt": take(ges), "position": take(pos), "depth": np.zeros((n, K, 1), np.float32),
                "presence": take(pres)}
    def reset(self):
        return self.convert(self.venv.reset())
    def step_wait(self):
        obs, r, d, infos = self.venv.step_wait()
        for i in np.flatnonzero(d):
            term = self.convert_rows(infos[i]["terminal_observation"][None], self.perm[i:i+1])
            infos[i]["terminal_observation"] = {k: v[0] for k, v in term.items()}
            self.perm[i] = self.rng.permutation(K)
        return self.convert(obs), r, d, infos

def make(seed, n=8):
    return OracleSlots(make_vec_env("locis/PushObjects-v0", n_envs=n, seed=seed,
                                    env_kwargs=dict(num_distractors=3, max_steps=100, obs_mode="state")), seed)

ppo = PPOConfig()
SEED = int(os.environ.get('SEED', 0))
torch.manual_seed(SEED)
env = make(SEED)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extractors import AttentionPoolEncoder, EncoderExtractor, PairMeanEncoder, PairSlotEncoder, RelationalSlotEncoder
encoders = {"set": (AttentionPoolEncoder, {}), "rel0": (RelationalSlotEncoder, dict(layers=0)),
            "rel1": (RelationalSlotEncoder, dict(layers=1)), "rel2": (RelationalSlotEncoder, dict(layers=2)),
            "pair": (PairSlotEncoder, {}), "pairmean": (PairMeanEncoder, {})}
encoder_class, encoder_kwargs = encoders[extractor]
kw = dict(features_extractor_class=EncoderExtractor,
          features_extractor_kwargs=dict(features_dim=128, encoder_class=encoder_class, **encoder_kwargs))
SHARE = os.environ.get('SHARE', '1') == '1'
kw = dict(kw, share_features_extractor=SHARE)
agent = PPO("MultiInputPolicy", env, policy_kwargs=kw, seed=SEED, device="cpu",
            tensorboard_log=None, **ppo.sb3_kwargs(steps, 8))
t = time.time()
curve = []
for chunk in range(steps // 25000):
    agent.learn(25000, reset_num_timesteps=False, tb_log_name=f"{extractor}_n{noise}_v{VEL}")
    sr = evaluate_success(agent, make(EVAL_SEED), 40)
    rew = np.mean([e["r"] for e in agent.ep_info_buffer])
    curve.append((agent.num_timesteps, sr, round(float(rew), 2)))
    print(curve[-1], round(time.time() - t), flush=True)
json.dump(curve, open(f"/tmp/oracle_{extractor}_n{noise}_v{VEL}_s{SEED}_share{SHARE}.json", "w"))
