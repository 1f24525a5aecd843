"""Oracle slots made imperfect the ways Loci-s slots are (exploratory diagnostic).

Usage (repository root):
``OMP_NUM_THREADS=1 python docs/measurements/oracle-slots-imperfect/imperfect_slots.py GOAL_DROP POSITION_NOISE SEED
[--steps N] [--noise-lag1 RHO | --noise-matched] [--swap-pusher P [--swap-per-episode]] [--motion-in-gestalt]
[--controllability [--most-controlled] | --zero-channel]`` writes ``runs/oracle_imperfect/goal<GOAL_DROP %>_noise<POSITION_NOISE x 100>[_lag<RHO x 100>]
[_matched][_swap<P %>[ep]][_motion][_control[most]|_zero][_<N / 1000>k]_s<SEED>/`` (compare's output folder: results.json, curves).

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

``--controllability`` is a second remedy: it appends to every slot's Gestalt code one number in
[0, 1], the fraction of the slot's (x, y) displacements that the agent's previous actions explain
linearly through the episode so far (the R^2 of a least-squares map from action to displacement,
fitted per env and slot on exponentially weighted sums, half-life ~7 frames, restarted with each
episode). Through a linear map any camera's image axes fit as well as the table's, so the same
number can be computed from Loci-s's image-space positions. The pusher's value climbs towards 1
within a few frames of any actions, random ones included; a resting object's stays near 0.

With ``--most-controlled`` that channel is instead 1 for the present slot with the highest such
R^2 (when it is above 0.2) and 0 for the others: a pushed target's motion follows the actions too
(R^2 ~0.5 while pushed, against the pusher's ~0.76, `--controllability`'s weakness), but the
pusher's is the best explained in 99.7 % of frames (a scripted push-the-target policy with noise).

Both compute with the library's `locis_rl.rl.controlled_slot.ControlledSlotTracker`. The runs in
`results.json` were made with this script's own numpy copy of it (commit 0340237), whose features
these match exactly for ``--most-controlled`` and within 6e-8 for the R^2 (float rounding, checked
over 400 steps of 4 envs with terminal frames), so reruns of ``--controllability`` alone need not be
bit-identical to the recorded ones.

``--zero-channel`` is the control for both remedies: it appends a Gestalt channel that is always 0,
which changes the networks' shapes (and so their random initialisation) but tells nothing.

compare also asks for the features of each finished episode's last frame (one row, for SB3's
value bootstrap); those get fresh draws and leave the per-env processes alone.
"""
import argparse
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from locis_rl.rl import compare
from locis_rl.rl.controlled_slot import ControlledSlotConfig, ControlledSlotTracker

# OracleSlots builds [pusher, target, goal, distractors...] before its permutation
PUSHER_INDEX, GOAL_INDEX = 0, 2
PRECISION_FILE = Path(__file__).parents[1] / "cpu-rl-pusher" / "position_precision_default.json"
KINDS = compare.ORACLE_KINDS  # kind of OracleSlots index i: KINDS[min(i, 3)]
# --controllability: the library's tracker with its defaults (half-life ~7 frames, a slot moving
# under ~0.005 = 1.5 mm a frame reads as at rest, no mark below R^2 0.2)
CONTROL = ControlledSlotTracker(ControlledSlotConfig())


def measured_position_errors() -> tuple[np.ndarray, np.ndarray]:
    """-> (std ``[4, 2]``, lag-1 autocorrelation ``[4]``) of Loci-s's slot position error per kind."""
    kinds = json.loads(PRECISION_FILE.read_text())["kinds"]
    return (np.array([kinds[kind]["slot_position_residual_std"] for kind in KINDS]),
            np.array([kinds[kind]["slot_position_residual_lag1"] for kind in KINDS]))


def make_imperfect(goal_drop: float, position_noise: float, seed: int, noise_lag1: float = 0.0,
                   swap_pusher: float = 0.0, noise_matched: bool = False,
                   swap_per_episode: bool = False, motion_in_gestalt: bool = False,
                   controllability: bool = False, zero_channel: bool = False,
                   most_controlled: bool = False) -> None:
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

    def explained_motion(self, xy: np.ndarray, order: np.ndarray, tracked: bool,
                         new_episode: np.ndarray) -> np.ndarray:
        """``xy [N, K, 2]`` -> per slot the R^2 of displacement on the previous action ``[N, K, 1]``."""
        if not tracked:
            # compare's one-row call for an episode's last frame comes before the env's new order
            # is drawn: the row is the env whose order it is; its statistics up to the frame before do
            rows = np.flatnonzero((getattr(self, "_previous_order", order) == order).all(1))
            fit = getattr(self, "_explained", None)
            return fit[rows[:1]] if fit is not None and len(rows) else np.zeros((*xy.shape[:2], 1), np.float32)
        state, action = getattr(self, "_control_state", None), getattr(self, "_last_action", None)
        position = torch.as_tensor(xy, dtype=torch.float64)
        if state is None or action is None:
            self._control_state = CONTROL.initial_state(position, action_dim=2)
            self._explained = np.zeros((*xy.shape[:2], 1), np.float32)
            return self._explained
        explained, _, state = CONTROL.step(state, torch.as_tensor(action), position,
                                           torch.ones(xy.shape[:2]))
        # a new episode's first frame: no action of that episode yet, so nothing is explained
        starts = torch.as_tensor(new_episode)
        self._control_state = CONTROL.reset_rows(state, starts, position)
        self._explained = torch.where(starts[:, None], 0.0, explained).numpy()[..., None]
        return self._explained

    def slots(self, state: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
        features = original(self, state, order)
        tracked = order.shape[0] == self.num_envs        # not the one-row features of a last frame
        previous_order = getattr(self, "_previous_order", None)
        # OracleSlots draws a new slot order for every episode, so a changed order marks a new one
        new_episode = (np.ones(order.shape[0], bool) if not tracked or previous_order is None
                       else (order != previous_order).any(1))
        if controllability:      # before _previous_order moves on: the one-row call looks it up
            explained = explained_motion(self, features["position"][..., :2], order, tracked, new_episode)
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
        if controllability:
            if most_controlled:
                score = np.where(features["presence"] > 0.5, explained[..., 0], -1.0)        # [N, K]
                best = score.argmax(1)[:, None]
                explained = ((np.arange(score.shape[1]) == best)
                             & (np.take_along_axis(score, best, 1) > CONTROL.config.min_explained))[..., None]
            features["gestalt"] = np.concatenate([features["gestalt"], explained], -1).astype(np.float32)
        if zero_channel:
            gestalt = features["gestalt"]
            features["gestalt"] = np.concatenate([gestalt, np.zeros_like(gestalt[..., :1])], -1)
        return features

    original_init = compare.OracleSlots.__init__

    extra_channels = 2 * motion_in_gestalt + controllability + zero_channel

    def init_with_extra_channels(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        spaces = dict(self.observation_space.spaces)
        k, g = spaces["gestalt"].shape
        spaces["gestalt"] = gym.spaces.Box(-np.inf, np.inf, (k, g + extra_channels), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    original_step_async = compare.OracleSlots.step_async

    def step_async_keeping_action(self, actions: np.ndarray) -> None:
        self._last_action = np.array(actions)
        original_step_async(self, actions)

    compare.OracleSlots.slots = slots
    if extra_channels:
        compare.OracleSlots.__init__ = init_with_extra_channels
    if controllability:
        compare.OracleSlots.step_async = step_async_keeping_action


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
    parser.add_argument("--controllability", action="store_true")
    parser.add_argument("--most-controlled", action="store_true")
    parser.add_argument("--zero-channel", action="store_true")
    args = parser.parse_args()
    if not 0.0 <= args.noise_lag1 < 1.0:
        parser.error(f"--noise-lag1: expected a value in [0, 1), actual value: {args.noise_lag1}")
    if not 0.0 <= args.swap_pusher <= 1.0:
        parser.error(f"--swap-pusher: expected a probability in [0, 1], actual value: {args.swap_pusher}")
    if args.noise_matched and (args.position_noise > 0 or args.noise_lag1 > 0):
        parser.error("--noise-matched sets the noise itself: give POSITION_NOISE 0 and no --noise-lag1")
    if args.controllability and args.zero_channel:
        parser.error("--zero-channel is the control for --controllability: give one of them")
    if args.most_controlled and not args.controllability:
        parser.error("--most-controlled changes what --controllability appends: give both")
    if args.swap_per_episode and args.swap_pusher == 0:
        parser.error("--swap-per-episode needs --swap-pusher P with P > 0")
    make_imperfect(args.goal_drop, args.position_noise, args.seed, args.noise_lag1, args.swap_pusher,
                   args.noise_matched, args.swap_per_episode, args.motion_in_gestalt, args.controllability,
                   args.zero_channel, args.most_controlled)
    name = f"goal{round(100 * args.goal_drop)}_noise{round(100 * args.position_noise)}"
    name += f"_lag{round(100 * args.noise_lag1)}" if args.noise_lag1 > 0 else ""
    name += "_matched" if args.noise_matched else ""
    name += f"_swap{round(100 * args.swap_pusher)}" if args.swap_pusher > 0 else ""
    name += "ep" if args.swap_per_episode else ""
    name += "_motion" if args.motion_in_gestalt else ""
    name += "_control" if args.controllability else ""
    name += "most" if args.most_controlled else ""
    name += "_zero" if args.zero_channel else ""
    name += f"_{args.steps // 1000}k" if args.steps != 250_000 else ""
    compare.main(["--inputs", "oracle_slots", "--seeds", str(args.seed), "--timesteps", str(args.steps),
                  "--num-envs", "8", "--num-slots", "8", "--eval-distractors", "3", "--device", "cpu",
                  "--out", f"runs/oracle_imperfect/{name}_s{args.seed}"])
