"""Env steps/s of the RL comparison's PPO loop (rollouts through LociSVecEnvWrapper + updates).

The same venv, policy and PPO settings as ``python -m locis_rl.rl.compare --inputs slots
--controlled-slot --num-envs 8 --num-slots 8``; only the learning is timed (no evaluation episodes).
Tells how long a run of the comparison takes on a machine:

    python docs/measurements/h100-wrapper/ppo_loop_speed.py --device cuda --timesteps 8192
"""
import argparse
import json
import time

import torch
from stable_baselines3 import PPO

from locis_rl.rl.compare import POLICIES, PPOConfig, make_venv, policy_kwargs
from locis_rl.rl.perception import load_locis

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cuda")
parser.add_argument("--timesteps", type=int, default=8192)
parser.add_argument("--num-envs", type=int, default=8)
parser.add_argument("--json", default=None)
args = parser.parse_args()

locis = load_locis("default", 0, 8)
venv = make_venv("slots", args.num_envs, seed=0, locis=locis, device=args.device, controlled_slot=True)
ppo = PPOConfig()
agent = PPO(POLICIES["slots"], venv, policy_kwargs=policy_kwargs("slots", ppo), seed=0, device=args.device,
            verbose=0, **ppo.sb3_kwargs(args.timesteps, args.num_envs))
start = time.perf_counter()
agent.learn(args.timesteps)
if args.device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
row = dict(device=args.device, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           num_envs=args.num_envs, timesteps=agent.num_timesteps, seconds=round(seconds, 2),
           env_steps_per_s=round(agent.num_timesteps / seconds, 1),
           hours_per_500k=round(500_000 / (agent.num_timesteps / seconds) / 3600, 2))
print(json.dumps(row))
if args.json:
    with open(args.json, "w") as f:
        json.dump(row, f, indent=1)
