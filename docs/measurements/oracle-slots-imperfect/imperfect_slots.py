"""Oracle slots made imperfect the ways Loci-s slots are (exploratory diagnostic).

Usage (repository root):
``OMP_NUM_THREADS=1 python docs/measurements/oracle-slots-imperfect/imperfect_slots.py GOAL_DROP POSITION_NOISE SEED
[--steps N] [--noise-lag1 RHO | --noise-matched] [--swap-pusher P [--swap-per-episode]] [--motion-in-gestalt]``
writes ``runs/oracle_imperfect/goal<GOAL_DROP %>_noise<POSITION_NOISE x 100>[_lag<RHO x 100>][_matched]
[_swap<P %>[ep]][_motion]_s<SEED>/`` (compare's output folder: results.json, curves).

`compare --inputs oracle_slots` with these changes, independently per env, to training and
evaluation episodes alike (PPO settings are compare's):
- the goal patch's slot is marked absent (presence 0) with probability ``GOAL_DROP`` in each frame,
  as when Loci-s leaves the flat goal patch to its background module (`docs/results.md`, "The depth
  model on this task");
- every slot's (x, y) gets Gaussian noise of standard deviation ``POSITION_NOISE`` (in the slots'
  units: the table's edge is at +-1, so 0.1 is 3 cm), fresh each frame. With ``--noise-lag1 RHO``
  the noise is an AR(1) process per env and slot, ``e_t = RHO e_(t-1) + sqrt(1 - RHO^2) n_t``, of
  the same standard deviation and lag-1 autocorrelation RHO, drawn afresh when an episode starts:
  an error that drifts from frame to frame, as Loci-s's does
  (`docs/measurements/cpu-rl-pusher/position_precision.py`);
- with ``--noise-matched`` (and POSITION_NOISE 0) the AR(1) noise takes, per object kind (pusher,
  target, goal, distractor) and axis, the standard deviation and lag-1 autocorrelation measured for
  the shipped checkpoint's slots (`docs/measurements/cpu-rl-pusher/position_precision_default.json`):
  Loci-s's position errors, replayed on perfect slots;
- with ``--swap-pusher P`` the pusher's kind code is swapped with that of a random present
  distractor, so that the pusher looks like a distractor and that distractor like the pusher, as
  when Loci-s's Gestalt codes confuse them (a linear read-out reads the pusher's slot as the
  pusher in 72 % of frames, and its misreadings stick to episodes, `position_precision.py`): in a
  fraction P of frames, drawn each frame, or with ``--swap-per-episode`` in a fraction P of
  episodes, for the whole episode.

``--motion-in-gestalt`` is a remedy, not a flaw: it appends to every slot's Gestalt code its (x, y)
displacement since the previous frame (x 10; 0 in an episode's first frame), so that
`SlotSetEncoder`'s content keys, which see the Gestalt code alone, can pick the pusher as the
thing that moves when the policy acts, whatever its kind code says.

compare also asks for the features of each finished episode's last frame (one row, for SB3's
value bootstrap); those get fresh draws and leave the per-env processes alone.
"""
import argparse
import json
from pathlib import Path

import gymnasium as gym
import numpy as np

from locis_rl.rl import compare

# OracleSlots builds [pusher, target, goal, distractors...] before its permutation
PUSHER_INDEX, GOAL_INDEX = 0, 2
PRECISION_FILE = Path(__file__).parents[1] / "cpu-rl-pusher" / "position_precision_default.json"
KINDS = compare.ORACLE_KINDS  # kind of OracleSlots index i: KINDS[min(i, 3)]


def measured_position_errors() -> tuple[np.ndarray, np.ndarray]:
    """-> (std ``[4, 2]``, lag-1 autocorrelation ``[4]``) of Loci-s's slot position error per kind."""
    kinds = json.loads(PRECISION_FILE.read_text())["kinds"]
    return (np.array([kinds[kind]["slot_position_residual_std"] for kind in KINDS]),
            np.array([kinds[kind]["slot_position_residual_lag1"] for kind in KINDS]))


def make_imperfect(goal_drop: float, position_noise: float, seed: int, noise_lag1: float = 0.0,
                   swap_pusher: float = 0.0, noise_matched: bool = False,
                   swap_per_episode: bool = False, motion_in_gestalt: bool = False) -> None:
    """Patch ``compare.OracleSlots.slots`` to spoil its features as described in the module docstring."""
    original = compare.OracleSlots.slots
    drop_rng = np.random.default_rng(10_000 + seed)
    noise_rng = np.random.default_rng(20_000 + seed)
    swap_rng = np.random.default_rng(30_000 + seed)
    kind_std, kind_lag1 = measured_position_errors() if noise_matched else (None, None)

    def position_error(self, order: np.ndarray, tracked: bool, new_episode: np.ndarray) -> np.ndarray:
        """-> the (x, y) error ``[N, K, 2]`` of this frame, advancing the per-env AR(1) processes."""
        if noise_matched:
            kind = np.minimum(order, len(KINDS) - 1)                                      # [N, K]
            std, lag1 = kind_std[kind], kind_lag1[kind][..., None]                        # [N, K, 2], [N, K, 1]
        else:
            std, lag1 = np.full((*order.shape, 2), position_noise), noise_lag1
        error = noise_rng.normal(0.0, 1.0, std.shape) * std
        if tracked:
            previous = getattr(self, "_position_error", None)
            if previous is not None:
                drifted = lag1 * previous + np.sqrt(1.0 - lag1 ** 2) * error
                error = np.where(new_episode[:, None, None], error, drifted)
            self._position_error = error
        return error

    def swap_partners(self, order: np.ndarray, presence: np.ndarray, tracked: bool,
                      new_episode: np.ndarray) -> np.ndarray:
        """-> per row the slot index whose kind code trades places with the pusher's, or -1 ``[N]``."""
        previous = getattr(self, "_swap_partner", None)
        partner = np.full(order.shape[0], -1)
        for row in range(order.shape[0]):
            if swap_per_episode and tracked and previous is not None and not new_episode[row]:
                partner[row] = previous[row]
                continue
            distractors = np.flatnonzero((order[row] > GOAL_INDEX) & (presence[row] > 0.5))
            if swap_rng.random() < swap_pusher and len(distractors):
                partner[row] = swap_rng.choice(distractors)
        if tracked:
            self._swap_partner = partner
        return partner

    def slots(self, state: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
        features = original(self, state, order)
        tracked = order.shape[0] == self.num_envs        # not the one-row features of a last frame
        previous_order = getattr(self, "_previous_order", None)
        # OracleSlots draws a new slot order for every episode, so a changed order marks a new one
        new_episode = (np.ones(order.shape[0], bool) if not tracked or previous_order is None
                       else (order != previous_order).any(1))
        if tracked:
            self._previous_order = order.copy()
        dropped = (order == GOAL_INDEX) & (drop_rng.random((order.shape[0], 1)) < goal_drop)  # [N, K]
        features["presence"] = np.where(dropped, 0.0, features["presence"]).astype(np.float32)
        if position_noise > 0 or noise_matched:
            position = features["position"].copy()                                       # [N, K, 4]
            position[..., :2] += position_error(self, order, tracked, new_episode)
            features["position"] = position.astype(np.float32)
        if swap_pusher > 0:
            gestalt = features["gestalt"]                                                  # [N, K, G]
            partner = swap_partners(self, order, features["presence"], tracked, new_episode)
            for row in np.flatnonzero(partner >= 0):
                pusher = int(np.flatnonzero(order[row] == PUSHER_INDEX)[0])
                gestalt[row, [pusher, partner[row]]] = gestalt[row, [partner[row], pusher]]
        if motion_in_gestalt:
            xy = features["position"][..., :2]                                            # [N, K, 2]
            previous = getattr(self, "_previous_xy", None)
            motion = np.zeros_like(xy) if previous is None or not tracked else np.where(
                new_episode[:, None, None], 0.0, 10.0 * (xy - previous))
            if tracked:
                self._previous_xy = xy.copy()
            features["gestalt"] = np.concatenate([features["gestalt"], motion], -1).astype(np.float32)
        return features

    original_init = compare.OracleSlots.__init__

    def init_with_motion(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        spaces = dict(self.observation_space.spaces)
        k, g = spaces["gestalt"].shape
        spaces["gestalt"] = gym.spaces.Box(-np.inf, np.inf, (k, g + 2), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    compare.OracleSlots.slots = slots
    if motion_in_gestalt:
        compare.OracleSlots.__init__ = init_with_motion


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("goal_drop", type=float)
    parser.add_argument("position_noise", type=float)
    parser.add_argument("seed", type=int)
    parser.add_argument("--steps", type=int, default=250_000)
    parser.add_argument("--noise-lag1", type=float, default=0.0)
    parser.add_argument("--noise-matched", action="store_true")
    parser.add_argument("--swap-pusher", type=float, default=0.0)
    parser.add_argument("--swap-per-episode", action="store_true")
    parser.add_argument("--motion-in-gestalt", action="store_true")
    args = parser.parse_args()
    if not 0.0 <= args.noise_lag1 < 1.0:
        parser.error(f"--noise-lag1: expected a value in [0, 1), actual value: {args.noise_lag1}")
    if not 0.0 <= args.swap_pusher <= 1.0:
        parser.error(f"--swap-pusher: expected a probability in [0, 1], actual value: {args.swap_pusher}")
    if args.noise_matched and (args.position_noise > 0 or args.noise_lag1 > 0):
        parser.error("--noise-matched sets the noise itself: give POSITION_NOISE 0 and no --noise-lag1")
    if args.swap_per_episode and args.swap_pusher == 0:
        parser.error("--swap-per-episode needs --swap-pusher P with P > 0")
    make_imperfect(args.goal_drop, args.position_noise, args.seed, args.noise_lag1, args.swap_pusher,
                   args.noise_matched, args.swap_per_episode, args.motion_in_gestalt)
    name = f"goal{round(100 * args.goal_drop)}_noise{round(100 * args.position_noise)}"
    name += f"_lag{round(100 * args.noise_lag1)}" if args.noise_lag1 > 0 else ""
    name += "_matched" if args.noise_matched else ""
    name += f"_swap{round(100 * args.swap_pusher)}" if args.swap_pusher > 0 else ""
    name += "ep" if args.swap_per_episode else ""
    name += "_motion" if args.motion_in_gestalt else ""
    compare.main(["--inputs", "oracle_slots", "--seeds", str(args.seed), "--timesteps", str(args.steps),
                  "--num-envs", "8", "--num-slots", "8", "--eval-distractors", "3", "--device", "cpu",
                  "--out", f"runs/oracle_imperfect/{name}_s{args.seed}"])
