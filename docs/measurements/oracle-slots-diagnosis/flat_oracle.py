import sys, time, json
import envs  # noqa
import numpy as np, torch, gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnvWrapper
from locis_rl.rl.compare import PPOConfig, evaluate_success, EVAL_SEED
mode = sys.argv[1]; steps = int(sys.argv[2])
cols = {"flat": [0,1,4,5,8,9,14,15,18,19,20,23,24,28],  # positions only (+present)
        "flatdiff": [0,1,4,5,8,9,10,11,12,13,14,15,18,19,20,23,24,28],
        "novel": [0,1,4,5,8,9,10,11,12,13] + list(range(14, 29)),
        "full": list(range(29)), "flatvel": [0,1,2,3,4,5,6,7,8,9] + list(range(14, 29))}[mode]
class Sel(VecEnvWrapper):
    def __init__(self, v):
        super().__init__(v, observation_space=gym.spaces.Box(-np.inf, np.inf, (len(cols),), np.float32))
    def reset(self): return self.venv.reset()[:, cols]
    def step_wait(self):
        o, r, d, i = self.venv.step_wait()
        for k in np.flatnonzero(d): i[k]["terminal_observation"] = i[k]["terminal_observation"][cols]
        return o[:, cols], r, d, i
def make(seed, n=8):
    return Sel(make_vec_env("locis/PushObjects-v0", n_envs=n, seed=seed,
                            env_kwargs=dict(num_distractors=3, max_steps=100, obs_mode="state")))
torch.manual_seed(0)
agent = PPO("MlpPolicy", make(0), seed=0, device="cpu", **PPOConfig().sb3_kwargs(steps, 8))
t = time.time()
for chunk in range(steps // 25000):
    agent.learn(25000, reset_num_timesteps=False)
    sr = evaluate_success(agent, make(EVAL_SEED), 40)
    print((agent.num_timesteps, sr, round(float(np.mean([e["r"] for e in agent.ep_info_buffer])), 2)), round(time.time() - t), flush=True)
