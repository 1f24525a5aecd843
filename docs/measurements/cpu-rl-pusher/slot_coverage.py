"""Which parts of a `locis/PushObjects-v0` frame a present slot holds: goal patch, pusher, target.

    python docs/measurements/cpu-rl-pusher/slot_coverage.py default slot_coverage_default.json
    python docs/measurements/cpu-rl-pusher/slot_coverage.py depth slot_coverage_depth.json

Random pushes in 8 envs (2 episodes x 40 frames each, the first 3 frames left out), seen through
the adapters' `SlotPerception` with 8 slots, once per slot seed 0, 1, 2 (the same frames each
time). A pixel is held when the argmax of the visible masks ``[B, K+1, H, W]`` (background last)
is a slot whose presence is above 0.5. The goal patch belongs
to the env's background id 0, so its pixels are the id-0 pixels of the goal's green; the pusher and
target are ids 1 and 2. Prints and writes the held fraction of each (pixels pooled over frames),
per slot seed and their mean.
"""
import json
import sys

import envs  # noqa: F401  (registers the env, headless GL)
import gymnasium as gym
import numpy as np
import torch
from envs.push_objects import PUSHER_ID, TARGET_ID

from locis_rl.evaluate import labels_from_masks
from locis_rl.rl.perception import SlotPerception, load_locis

NUM_ENVS, EPISODES, FRAMES, SKIP, NUM_SLOTS, SLOT_SEEDS = 8, 2, 40, 3, 8, (0, 1, 2)


def held_pixels(masks: torch.Tensor, presence: torch.Tensor) -> np.ndarray:
    """bool [B, H, W]: pixels whose visible-mask argmax is a present slot."""
    labels = labels_from_masks(masks)                             # [B, H, W]: 0 background, k + 1 slot k
    present = torch.cat([torch.zeros_like(presence[:, :1], dtype=torch.bool), presence > 0.5], 1)
    return torch.gather(present, 1, labels.flatten(1)).view_as(labels).cpu().numpy()


def held_fractions(checkpoint: str, slot_seed: int) -> dict[str, float]:
    vec = gym.vector.SyncVectorEnv([lambda: gym.make("locis/PushObjects-v0", info_segmentation=True)
                                    for _ in range(NUM_ENVS)])
    perception = SlotPerception(load_locis(checkpoint, num_slots=NUM_SLOTS), num_envs=NUM_ENVS,
                                device="cpu", seed=slot_seed)
    rng = np.random.default_rng(0)
    counts = {"goal": [0, 0], "pusher": [0, 0], "target": [0, 0]}
    for episode in range(EPISODES):
        obs, info = vec.reset(seed=1000 + 100 * episode)
        perception.reset(obs["rgb"], obs["depth"])
        for t in range(FRAMES):
            if t >= SKIP:
                held = held_pixels(perception.last_output["masks"], perception.last_output["presence"])
                seg, rgb = info["segmentation"], obs["rgb"].astype(np.float32) / 255
                green = (rgb[..., 1] > rgb[..., 0] + 0.15) & (rgb[..., 1] > rgb[..., 2] + 0.15)
                parts = {"goal": (seg == 0) & green, "pusher": seg == PUSHER_ID, "target": seg == TARGET_ID}
                for name, pixels in parts.items():
                    counts[name][0] += int((held & pixels).sum())
                    counts[name][1] += int(pixels.sum())
            action = rng.uniform(-1, 1, (NUM_ENVS, 2)).astype(np.float32)
            obs, _, terminated, truncated, info = vec.step(action)
            perception.step(obs["rgb"], obs["depth"], reset_mask=terminated | truncated)
    vec.close()
    return {k: held / max(total, 1) for k, (held, total) in counts.items()}


def main(checkpoint: str, out_path: str) -> None:
    torch.set_num_threads(1)
    per_seed = {seed: held_fractions(checkpoint, seed) for seed in SLOT_SEEDS}
    result = {"checkpoint": checkpoint, "num_slots": NUM_SLOTS,
              "held_fraction_per_slot_seed": per_seed,
              "held_fraction_mean": {k: float(np.mean([f[k] for f in per_seed.values()]))
                                     for k in ("goal", "pusher", "target")}}
    print(json.dumps(result, indent=1))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
