"""A/B of gaussian_heatmap with and without its subnormal cut-off, inside whole LociS steps.

Shipped checkpoint run with 8 slots (the RL setting), one batched step of 8 consecutive
PushObjects-v0 frames, 1 thread; the two variants alternate in one process so both see the same
load. Prints the median step time per round and the largest feature difference between the variants
over the 12 steps (warm-up frame included).

    OMP_NUM_THREADS=1 python docs/measurements/cpu-denormals/ab_heatmap_cutoff.py
"""
import time

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401  (registers locis/PushObjects-v0)
import locis_rl.model.blocks as blocks
import locis_rl.model.decoder as decoder
import locis_rl.model.encoder as encoder
import locis_rl.model.locis as locis
from locis_rl.model import LociS

torch.set_num_threads(1)
with_cutoff = blocks.gaussian_heatmap


def without_cutoff(position, height, width):
    """The heatmap before the cut-off: its tails reach float32's subnormal range."""
    grid = blocks.coordinate_grid(height, width, device=position.device, dtype=position.dtype)
    std = position[..., 2, None, None].clamp_min(1e-3)
    dist2 = (grid[0] - position[..., 0, None, None]).pow(2) + (grid[1] - position[..., 1, None, None]).pow(2)
    return torch.exp(-0.5 * dist2 / std.pow(2))


def use(heatmap):
    for module in (blocks, decoder, encoder, locis):
        module.gaussian_heatmap = heatmap


model = LociS.from_pretrained("default", overrides={"num_slots": 8}).eval()
env = gym.make("locis/PushObjects-v0")
obs, _ = env.reset(seed=0)
frames = []
for _ in range(20):
    obs, *_ = env.step(env.action_space.sample())
    frames.append(obs["rgb"])
video = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


def run(heatmap):
    use(heatmap)
    state, times, outs = model.init_state(8, seed=0), [], []
    with torch.inference_mode():
        for t in range(12):
            start = time.perf_counter()
            out, state = model.step(video[t:t + 8], state=state, reconstruct_rgb=False)
            times.append(time.perf_counter() - start)
            outs.append(out)
    return float(np.median(times[2:])) * 1000, outs


times = {"without": [], "with": []}
for _ in range(3):
    t, before = run(without_cutoff)
    times["without"].append(round(t))
    t, after = run(with_cutoff)
    times["with"].append(round(t))
print("median ms per step, 3 rounds:", times)
keys = ("gestalt", "position", "presence", "slot_depth", "masks")
print("max |difference| over 12 steps:",
      {k: max((a[k] - b[k]).abs().max().item() for a, b in zip(before, after)) for k in keys})
