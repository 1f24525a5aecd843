"""Oracle slots made imperfect the ways Loci-s slots are (exploratory diagnostic).

Usage (repository root):
``OMP_NUM_THREADS=1 python docs/measurements/oracle-slots-imperfect/imperfect_slots.py GOAL_DROP POSITION_NOISE SEED
[--steps N] [--noise-lag1 RHO]`` writes ``runs/oracle_imperfect/goal<GOAL_DROP %>_noise<POSITION_NOISE x 100>
[_lag<RHO x 100>]_s<SEED>/`` (compare's output folder: results.json, curves).

`compare --inputs oracle_slots` with two changes, applied in every frame, independently per env,
to training and evaluation episodes alike (PPO settings are compare's):
- the goal patch's slot is marked absent (presence 0) with probability ``GOAL_DROP``, as when
  Loci-s leaves the flat goal patch to its background module (`docs/results.md`, "The depth model
  on this task");
- every slot's (x, y) gets Gaussian noise of standard deviation ``POSITION_NOISE`` (in the slots'
  units: the table's edge is at +-1, so 0.1 is 3 cm). With ``--noise-lag1 RHO`` the noise is an
  AR(1) process per env and slot, ``e_t = RHO e_(t-1) + sqrt(1 - RHO^2) n_t``, of the same standard
  deviation and lag-1 autocorrelation RHO: an error that drifts from frame to frame, as Loci-s's does
  (`docs/measurements/cpu-rl-pusher/position_precision.py`), instead of fresh noise each frame.
"""
import argparse

import numpy as np

from locis_rl.rl import compare

GOAL_INDEX = 2  # OracleSlots builds [pusher, target, goal, distractors...] before its permutation


def make_imperfect(goal_drop: float, position_noise: float, seed: int, noise_lag1: float = 0.0) -> None:
    original = compare.OracleSlots.slots
    drop_rng = np.random.default_rng(10_000 + seed)
    noise_rng = np.random.default_rng(20_000 + seed)

    def slots(self, state: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
        features = original(self, state, order)
        dropped = (order == GOAL_INDEX) & (drop_rng.random((order.shape[0], 1)) < goal_drop)  # [N, K]
        features["presence"] = np.where(dropped, 0.0, features["presence"]).astype(np.float32)
        if position_noise > 0:
            position = features["position"].copy()                                       # [N, K, 4]
            fresh = noise_rng.normal(0.0, position_noise, position[..., :2].shape)
            previous = getattr(self, "_position_noise", None)   # per wrapper: training and evaluation envs
            if noise_lag1 > 0 and previous is not None and previous.shape == fresh.shape:
                fresh = noise_lag1 * previous + np.sqrt(1.0 - noise_lag1 ** 2) * fresh
            self._position_noise = fresh
            position[..., :2] += fresh
            features["position"] = position.astype(np.float32)
        return features

    compare.OracleSlots.slots = slots


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("goal_drop", type=float)
    parser.add_argument("position_noise", type=float)
    parser.add_argument("seed", type=int)
    parser.add_argument("--steps", type=int, default=250_000)
    parser.add_argument("--noise-lag1", type=float, default=0.0)
    args = parser.parse_args()
    if not 0.0 <= args.noise_lag1 < 1.0:
        parser.error(f"--noise-lag1: expected a value in [0, 1), actual value: {args.noise_lag1}")
    make_imperfect(args.goal_drop, args.position_noise, args.seed, args.noise_lag1)
    name = f"goal{round(100 * args.goal_drop)}_noise{round(100 * args.position_noise)}"
    name += f"_lag{round(100 * args.noise_lag1)}" if args.noise_lag1 > 0 else ""
    compare.main(["--inputs", "oracle_slots", "--seeds", str(args.seed), "--timesteps", str(args.steps),
                  "--num-envs", "8", "--num-slots", "8", "--eval-distractors", "3", "--device", "cpu",
                  "--out", f"runs/oracle_imperfect/{name}_s{args.seed}"])
