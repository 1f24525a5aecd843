"""Does the controlled-slot cue find the pusher among the shipped checkpoint's slots?

    python docs/measurements/cpu-rl-pusher/controlled_slot_accuracy.py default controlled_slot_default.json

The setting of `position_precision.py` (8 envs x 3 episodes x 40 random pushes, 8 slots, slot seed
0, the first 3 frames of an episode left out; present slots matched to the things on the table by
mask IoU, Hungarian, IoU >= 0.2). Each frame `locis_rl.rl.controlled_slot.ControlledSlotTracker`
(default settings) marks the slot whose image-space motion the previous actions explain best.
Reported: the fraction of frames with a mark, and of those how often the marked slot is the one
matched to the pusher, to another thing, or to nothing; per episode the fraction of frames whose
mark is on the pusher; and, for comparison, `position_precision.py`'s Gestalt read-out (the pusher's
slot read as the pusher in 72 % of frames, misreadings stuck to episodes).
"""
import json
import sys
from pathlib import Path

import envs  # noqa: F401  (registers the env, headless GL)
import gymnasium as gym
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from locis_rl.evaluate import labels_from_masks
from locis_rl.rl.controlled_slot import ControlledSlotTracker
from locis_rl.rl.perception import SlotPerception, load_locis

sys.path.insert(0, str(Path(__file__).parent))
from position_precision import EPISODES, FRAMES, MIN_IOU, NUM_ENVS, NUM_SLOTS, SKIP, SLOT_SEED, things  # noqa: E402


def held_by_slot(info: dict, obs: dict, out: dict, env: int) -> dict[int, str]:
    """Slot index -> the kind of thing it holds (Hungarian on mask IoU >= MIN_IOU) for one frame."""
    labels = labels_from_masks(out["masks"][env:env + 1]).cpu().numpy()[0]
    present = out["presence"][env].cpu().numpy() > 0.5
    gt = things(info["segmentation"][env], obs["rgb"][env], info["objects"], info["goal_position"], env)
    slots = [k for k in range(NUM_SLOTS) if present[k]]
    iou = np.zeros((len(gt), len(slots)))
    for i, (_, m, _, _) in enumerate(gt):
        for j, k in enumerate(slots):
            s = labels == k + 1
            union = (m | s).sum()
            iou[i, j] = (m & s).sum() / union if union else 0.0
    if not slots:
        return {}
    return {slots[j]: gt[i][0] for i, j in zip(*linear_sum_assignment(iou, maximize=True)) if iou[i, j] >= MIN_IOU}


def main() -> None:
    torch.set_num_threads(1)
    vec = gym.vector.SyncVectorEnv([lambda: gym.make("locis/PushObjects-v0", info_segmentation=True)
                                    for _ in range(NUM_ENVS)])
    perception = SlotPerception(load_locis(sys.argv[1], num_slots=NUM_SLOTS), num_envs=NUM_ENVS,
                                device="cpu", seed=SLOT_SEED)
    tracker = ControlledSlotTracker()
    rng = np.random.default_rng(0)
    marked_on: list[tuple[int, int, str]] = []     # (env, episode, what the marked slot holds)
    frames = 0
    for episode in range(EPISODES):
        obs, info = vec.reset(seed=2000 + 100 * episode)
        features = perception.reset(obs["rgb"], obs["depth"])
        state = tracker.initial_state(torch.as_tensor(features["position"][..., :2]), action_dim=2)
        for t in range(FRAMES):
            action = rng.uniform(-1, 1, (NUM_ENVS, 2)).astype(np.float32)
            obs, _, terminated, truncated, info = vec.step(action)
            if (terminated | truncated).any():
                raise RuntimeError("an episode ended within the measured frames; shorten FRAMES")
            features = perception.step(obs["rgb"], obs["depth"])
            _, controlled, state = tracker.step(state, torch.as_tensor(action),
                                                torch.as_tensor(features["position"][..., :2]),
                                                torch.as_tensor(features["presence"]))
            if t + 1 < SKIP:
                continue
            out = perception.last_output
            for env in range(NUM_ENVS):
                frames += 1
                mark = np.flatnonzero(controlled[env].numpy() > 0.5)
                if len(mark):
                    marked_on.append((env, episode, held_by_slot(info, obs, out, env).get(int(mark[0]), "nothing")))
    vec.close()
    held = np.array([m[2] for m in marked_on])
    per_episode: dict[tuple[int, int], list[bool]] = {}
    for env, episode, kind in marked_on:
        per_episode.setdefault((env, episode), []).append(kind == "pusher")
    rates = sorted(float(np.mean(v)) for v in per_episode.values())
    result = {"checkpoint": sys.argv[1], "num_slots": NUM_SLOTS, "frames": frames,
              "frames_with_a_mark": len(marked_on) / frames,
              "mark_holds": {k: float((held == k).mean()) for k in np.unique(held)},
              "per_episode_mark_on_pusher": rates,
              "episodes_with_mark_on_pusher_over_half": float(np.mean(np.array(rates) > 0.5))}
    print(json.dumps(result, indent=1))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
