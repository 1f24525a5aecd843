"""Oracle slots made imperfect the ways Loci-s slots are (exploratory diagnostic).

Usage (repository root):
``OMP_NUM_THREADS=1 python docs/measurements/oracle-slots-imperfect/imperfect_slots.py GOAL_DROP POSITION_NOISE SEED [STEPS]``
writes ``runs/oracle_imperfect/goal<GOAL_DROP %>_noise<POSITION_NOISE x 100>_s<SEED>/`` (compare's
output folder: results.json, curves).

`compare --inputs oracle_slots` with two changes, applied in every frame, independently per env,
to training and evaluation episodes alike (PPO settings are compare's):
- the goal patch's slot is marked absent (presence 0) with probability ``GOAL_DROP``, as when
  Loci-s leaves the flat goal patch to its background module (`docs/results.md`, "The depth model
  on this task");
- every slot's (x, y) gets Gaussian noise of standard deviation ``POSITION_NOISE`` (in the slots'
  units: the table's edge is at +-1, so 0.1 is 3 cm).
"""
import sys

import numpy as np

from locis_rl.rl import compare

GOAL_INDEX = 2  # OracleSlots builds [pusher, target, goal, distractors...] before its permutation


def make_imperfect(goal_drop: float, position_noise: float, seed: int) -> None:
    original = compare.OracleSlots.slots
    drop_rng = np.random.default_rng(10_000 + seed)
    noise_rng = np.random.default_rng(20_000 + seed)

    def slots(self, state: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
        features = original(self, state, order)
        dropped = (order == GOAL_INDEX) & (drop_rng.random((order.shape[0], 1)) < goal_drop)  # [N, K]
        features["presence"] = np.where(dropped, 0.0, features["presence"]).astype(np.float32)
        if position_noise > 0:
            position = features["position"].copy()                                       # [N, K, 4]
            position[..., :2] += noise_rng.normal(0.0, position_noise, position[..., :2].shape)
            features["position"] = position.astype(np.float32)
        return features

    compare.OracleSlots.slots = slots


if __name__ == "__main__":
    goal_drop, position_noise, seed = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    steps = sys.argv[4] if len(sys.argv) > 4 else "250000"
    make_imperfect(goal_drop, position_noise, seed)
    name = f"goal{round(100 * goal_drop)}_noise{round(100 * position_noise)}_s{seed}"
    compare.main(["--inputs", "oracle_slots", "--seeds", str(seed), "--timesteps", steps, "--num-envs", "8",
                  "--num-slots", "8", "--eval-distractors", "3", "--device", "cpu",
                  "--out", f"runs/oracle_imperfect/{name}"])
