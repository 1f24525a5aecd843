"""Can a policy read the task state from the slots? A supervised check for `locis/PushObjects-v0`.

    python examples/decode_push_state.py                    # the shipped model, 8 slots (~10 min on CPU)
    python examples/decode_push_state.py --checkpoint tiny --episodes-per-env 1 --steps 8 --iterations 20

Before spending hours of PPO on slot features, check that what the task needs is in them at all.
The pusher moves at random in `num_envs` PushObjects envs observed through Loci-s (the SB3 / TorchRL
adapters' perception); every frame gives the slot features and, from the env's info, the two
relations the task turns on: target - pusher and goal - target (x, y, divided by 0.3 m, as in the
state observation). A `SlotSetEncoder`, the encoder of the policies' `SlotSetExtractor`, plus a
linear head is trained to regress them (MSE, Adam) on three quarters of the episodes. The held-out
quarter gives R² per quantity (1 = exact, 0 = no better than the mean).

Every field of `Args` is a command-line flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass

import envs  # noqa: F401  (registers locis/PushObjects-v0, picks headless MuJoCo GL)
import gymnasium as gym
import numpy as np
import torch
from envs.push_objects import PUSHER_ID, STATE_POS_SCALE, TARGET_ID

from locis_rl.rl.perception import SlotPerception
from locis_rl.rl.slot_set import SlotSetEncoder


@dataclass
class Args:
    checkpoint: str = "default"
    """Loci-s weights: "default", a checkpoint path, or "tiny" (random weights, smoke runs)"""
    num_slots: int = 8
    """slots at inference (the comparison of docs/results.md uses 8; 0: the checkpoint's own)"""
    num_envs: int = 8
    episodes_per_env: int = 16
    steps: int = 50
    """random pushes per episode"""
    skip_frames: int = 3
    """first frames of an episode left out (the slots are still being assigned)"""
    iterations: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0
    threads: int = 1
    json_out: str | None = None

QUANTITIES = ("target-pusher dx", "target-pusher dy", "goal-target dx", "goal-target dy")
FEATURES = ("gestalt", "position", "depth", "presence")


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        kind = type(f.default) if f.default is not None else str
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    return Args(**vars(parser.parse_args()))


def load_model(checkpoint: str, num_slots: int):
    if checkpoint == "tiny":
        from locis_rl.model import LociS, LociSConfig
        from locis_rl.model.config import apply_inference_overrides

        config = LociSConfig.preset("tiny")
        return LociS(apply_inference_overrides(config, num_slots=num_slots or None))
    return checkpoint  # SlotPerception loads names / paths itself, with the slot override


def relations(info: dict) -> np.ndarray:
    """(target - pusher, goal - target) in x, y, scaled like the state observation."""
    objects = info["objects"]
    ids = list(objects["id"])
    xy = np.asarray(objects["position"])[:, :2]
    pusher, target = xy[ids.index(PUSHER_ID)], xy[ids.index(TARGET_ID)]
    return np.concatenate([target - pusher, info["goal_position"] - target]) / STATE_POS_SCALE


if __name__ == "__main__":
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # ---- roll-outs: slot features and the relations they should carry -------------------------
    model = load_model(args.checkpoint, args.num_slots)
    slots_override = None if args.checkpoint == "tiny" or args.num_slots == 0 else args.num_slots
    perception = SlotPerception(model, num_envs=args.num_envs, device="cpu", mode="seg", seed=args.seed,
                                num_slots=slots_override)
    env_list = [gym.make("locis/PushObjects-v0").unwrapped for _ in range(args.num_envs)]
    features = {name: [] for name in FEATURES}
    targets, episode_of_frame = [], []
    start = time.time()
    for episode in range(args.episodes_per_env):
        observations = [env.reset(seed=args.seed + 1000 * episode + i)[0] for i, env in enumerate(env_list)]
        perception.reset(np.stack([o["rgb"] for o in observations]), np.stack([o["depth"] for o in observations]))
        for t in range(args.steps):
            steps = [env.step(rng.uniform(-1, 1, 2).astype(np.float32)) for env in env_list]
            feats = perception.step(np.stack([s[0]["rgb"] for s in steps]), np.stack([s[0]["depth"] for s in steps]))
            if t < args.skip_frames:
                continue
            for i, (_, _, _, _, info) in enumerate(steps):
                for name in FEATURES:
                    features[name].append(feats[name][i])
                targets.append(relations(info))
                episode_of_frame.append(episode * args.num_envs + i)
        print(f"episode {episode + 1}/{args.episodes_per_env}: {len(targets)} frames "
              f"({time.time() - start:.0f} s)", flush=True)
    for env in env_list:
        env.close()
    x = {name: torch.tensor(np.stack(v), dtype=torch.float32) for name, v in features.items()}
    y = torch.tensor(np.stack(targets), dtype=torch.float32)
    held_out = torch.as_tensor(np.asarray(episode_of_frame) % 4 == 0)  # whole episodes
    if held_out.all() or not held_out.any():
        raise SystemExit("need at least 2 episodes (num_envs * episodes_per_env >= 2) to hold one out")
    train_rows = torch.nonzero(~held_out).squeeze(1)

    # ---- the policies' slot-set encoder + a linear head, trained to regress the relations -------
    encoder = SlotSetEncoder(x["gestalt"].shape[-1], features_dim=128)
    head = torch.nn.Linear(128, len(QUANTITIES))
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=args.learning_rate)

    def predict(rows: torch.Tensor) -> torch.Tensor:
        return head(encoder(*(x[name][rows] for name in FEATURES)))

    for it in range(args.iterations):
        batch = train_rows[torch.randint(len(train_rows), (args.batch_size,))]
        loss = torch.nn.functional.mse_loss(predict(batch), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        test_rows = torch.nonzero(held_out).squeeze(1)
        error = ((predict(test_rows) - y[test_rows]) ** 2).sum(0)
        spread = ((y[test_rows] - y[test_rows].mean(0)) ** 2).sum(0).clamp_min(1e-12)
        r2 = (1 - error / spread).tolist()
    print(f"\n{args.checkpoint} ({perception.num_slots} slots): {len(train_rows)} training / {len(test_rows)} "
          f"held-out frames, final training MSE {loss.item():.4f}")
    print("| quantity | held-out R² |\n|---|---|")
    for name, value in zip(QUANTITIES, r2):
        print(f"| {name} | {value:.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": dataclasses.asdict(args), "r2": dict(zip(QUANTITIES, r2)),
                       "train_frames": len(train_rows), "test_frames": len(test_rows)}, f, indent=1)
        print(f"\nwrote {args.json_out}")
