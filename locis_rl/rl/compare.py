"""Slots vs pixels vs ground-truth state: PPO on ``locis/PushObjects-v0`` with equal budgets.

Four inputs, one set of PPO hyper-parameters (:class:`PPOConfig`) and one env-step budget:

    slots         frozen Loci-s slot features (``LociSVecEnvWrapper``, batched on the env side) read
                  by ``SlotSetExtractor`` (``MultiInputPolicy``, actor and critic each with their own)
    pixels        the RGB image (64x64x3 uint8, ``VecTransposeImage``) read by SB3's ``CnnPolicy``
    state         the ground-truth state vector (``obs_mode="state"``), the oracle, with ``MlpPolicy``
    oracle_slots  perfect slots made from the true state (:class:`OracleSlots`), read like ``slots``:
                  what the slot policy learns when perception makes no mistake. It separates the
                  policy's share of a gap to ``state`` from the perception's share.

With ``--controlled-slot`` the slot inputs also carry :class:`~locis_rl.rl.sb3.ControlledSlotVecEnv`'s
cue, a mark on the slot the agent's actions move (docs/results.md, "Which slot do I move?").

For every (input, seed) the deterministic policy's success rate is measured every ``--eval-every``
env steps on held-out env seeds (learning curves); after training each policy is evaluated, without
retraining, on scenes with more distractors (``--eval-distractors``).

Usage:
    python -m locis_rl.rl.compare --inputs slots pixels state --seeds 0 1 2 --timesteps 250000 \\
        --num-envs 8 --checkpoint default --out runs/rl_compare --eval-distractors 3 6 10
    python -m locis_rl.rl.compare --timesteps 256 --seeds 0 --num-envs 2 --checkpoint tiny \\
        --eval-episodes 2 --out /tmp/rl_compare            # smoke test (random-weight Loci-s)

Outputs in ``--out``:
    results.json              settings, one entry per run (curve, final success, distractors), summary
    results.md                final success at equal steps, steps to reach the oracle, distractors
    learning_curves.png       success rate vs env steps, mean +- std over seeds, one line per input
    distractors.png           success rate vs number of distractors
    models/<input>_seed<k>.zip, tb/ (TensorBoard)
    progress.md, learning_curves_progress.png   with ``--progress-report`` (trains nothing): the
                              curves so far, unfinished runs included from their mid-run checkpoints

Resuming: runs already completed in ``results.json`` are skipped (their saved models are only
re-evaluated for distractor counts not measured yet); settings that change training must match.
A run stopped in the middle (``kill -9``, a session that ended) continues from its last mid-run
checkpoint, ``partial/<input>_seed<k>.zip`` + ``.json``, written atomically at the first rollout
boundary after every ``--save-every`` env steps (default: every rollout): the policy, its optimiser,
the curve so far and the wall-clock. It loses at most the steps since that checkpoint. The
continuation is not bit-identical to an uninterrupted run: the rollout in progress, the env episodes
and the sampling RNG start afresh (the envs and RNG are re-seeded with ``seed + env steps done``, so
no episode sequence is replayed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import envs  # noqa: F401  (first: registers locis/... and picks headless MuJoCo GL)
import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper, VecTransposeImage
from tqdm import tqdm

from locis_rl.atomic_files import write_atomically
from locis_rl.devices import cli_device
from locis_rl.rl.perception import load_locis
from locis_rl.rl.sb3 import ControlledSlotVecEnv, LociSVecEnvWrapper, SlotSetExtractor

__all__ = ["PPOConfig", "INPUTS", "OracleSlots", "make_venv", "evaluate_success", "summarise", "main"]

ENV_ID = "locis/PushObjects-v0"
INPUTS = ("slots", "pixels", "state", "oracle_slots")
POLICIES = {"slots": "MultiInputPolicy", "pixels": "CnnPolicy", "state": "MlpPolicy",
            "oracle_slots": "MultiInputPolicy"}
SLOT_INPUTS = ("slots", "oracle_slots")
ORACLE_SLOTS_DEFAULT = 6
"""Slots of ``oracle_slots`` when ``--num-slots 0`` (the shipped checkpoint's own number)."""
EVAL_SEED = 1_000_000
"""Base seed of the held-out evaluation episodes (training envs use the run's seed)."""
ORACLE = "state"
RESULTS_VERSION = 1


@dataclass
class PPOConfig:
    """PPO hyper-parameters shared by every input (SB3 names)."""

    n_steps: int = 512
    """env steps per env per rollout (8 envs: 4096 steps per update)"""
    batch_size: int = 256
    n_epochs: int = 10
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    features_dim: int = 128
    """output size of the features extractor (slots: SlotSetExtractor; pixels: NatureCNN)"""

    def sb3_kwargs(self, timesteps: int, num_envs: int) -> dict[str, Any]:
        """Arguments of ``PPO``; a rollout never holds more steps than the whole budget."""
        n_steps = max(2, min(self.n_steps, timesteps // num_envs))
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "features_dim"}
        kwargs.update(n_steps=n_steps, batch_size=min(self.batch_size, n_steps * num_envs))
        return kwargs

    @classmethod
    def from_overrides(cls, items: list[str]) -> "PPOConfig":
        """``["n_steps=256", "learning_rate=1e-4"]`` -> a config with those fields changed."""
        config, fields = cls(), {f.name: f for f in dataclasses.fields(cls)}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"--ppo: expected KEY=VALUE with KEY in {sorted(fields)}, actual value: {item!r}")
            setattr(config, key, type(getattr(config, key))(value))
        return config


# ---- environments ------------------------------------------------------------------------------

ORACLE_KINDS = ("pusher", "target", "goal", "distractor")


class OracleSlots(VecEnvWrapper):
    """Ground-truth slots of PushObjects from its state observation, in the layout of the Loci-s features.

    One slot per thing on the table: pusher, target, goal patch and the ``num_slots - 3`` distractors
    nearest to the pusher (fewer distractors leave slots absent). ``gestalt [K, 4]`` is the one-hot
    kind (pusher, target, goal, distractor), ``position [K, 4]`` is ``(x, y, 0, 0)`` with x, y the
    table position / ``STATE_POS_SCALE`` (edge at +-1), ``depth [K, 1]`` is 0, ``presence [K]`` is
    1 or 0. Like Loci-s slots they carry no velocity and their order is arbitrary: a new random
    permutation per episode (seeded), so the policy must tell the objects apart by their content.

    ``venv`` must be PushObjects with ``obs_mode="state"`` and ``state_distractors = num_slots - 3``.
    """

    def __init__(self, venv: VecEnv, num_slots: int, seed: int = 0):
        if num_slots < 3:
            raise ValueError(f"num_slots: expected >= 3 (pusher, target, goal), actual value: {num_slots}")
        expected = 14 + 5 * (num_slots - 3)
        if venv.observation_space.shape != (expected,):
            raise ValueError(f"OracleSlots: expected PushObjects state observations of size {expected} "
                             f"(state_distractors={num_slots - 3}), actual space: {venv.observation_space}")
        k, g = num_slots, len(ORACLE_KINDS)
        space = gym.spaces.Dict({
            "gestalt": gym.spaces.Box(0.0, 1.0, (k, g), np.float32),
            "position": gym.spaces.Box(-np.inf, np.inf, (k, 4), np.float32),
            "depth": gym.spaces.Box(-np.inf, np.inf, (k, 1), np.float32),
            "presence": gym.spaces.Box(0.0, 1.0, (k,), np.float32),
        })
        super().__init__(venv, observation_space=space)
        self.num_slots = k
        self.seed_orders(seed)
        kind = np.minimum(np.arange(k), g - 1)                     # pusher, target, goal, distractors
        self._gestalt = np.eye(g, dtype=np.float32)[kind]          # [K, G] before the permutation

    def seed_orders(self, seed: int | None) -> None:
        """Restart the stream of slot orders (one permutation per env and episode)."""
        self._rng = np.random.default_rng(seed)
        self._order = np.stack([self._rng.permutation(self.num_slots) for _ in range(self.num_envs)])

    def seed(self, seed: int | None = None):
        self.seed_orders(seed)
        return self.venv.seed(seed)

    def slots(self, state: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
        """``state [N, 14 + 5 (K-3)]``, ``order [N, K]`` -> the slot features of the N rows."""
        n, k = state.shape[0], self.num_slots
        distractors = state[:, 14:].reshape(n, k - 3, 5)
        xy = np.concatenate([state[:, None, 0:2], state[:, None, 4:6], state[:, None, 8:10],
                             distractors[..., :2]], 1)                               # [N, K, 2]
        presence = np.concatenate([np.ones((n, 3), np.float32), distractors[..., 4]], 1)
        position = np.concatenate([xy, np.zeros((n, k, 2))], -1)
        features = {"gestalt": np.broadcast_to(self._gestalt, (n, k, self._gestalt.shape[1])),
                    "position": position, "depth": np.zeros((n, k, 1)), "presence": presence}
        return {key: np.take_along_axis(v, order.reshape(n, k, *([1] * (v.ndim - 2))), 1).astype(np.float32)
                for key, v in features.items()}

    def reset(self):
        return self.slots(self.venv.reset(), self._order)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        for i in np.flatnonzero(dones):
            final = self.slots(np.asarray(infos[i]["terminal_observation"])[None], self._order[i:i + 1])
            infos[i]["terminal_observation"] = {key: v[0] for key, v in final.items()}
            self._order[i] = self._rng.permutation(self.num_slots)   # the next episode's order
        return self.slots(obs, self._order), rewards, dones, infos


class RGBObservation(gym.ObservationWrapper):
    """Keep only the ``rgb`` image (``uint8 (H, W, 3)``) of PushObjects' pixel observation."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = env.observation_space["rgb"]

    def observation(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return observation["rgb"]


def make_venv(input_name: str, num_envs: int, seed: int, *, num_distractors: int = 3,
              max_steps: int = 100, locis: torch.nn.Module | None = None, device: str = "auto",
              subproc: bool = False, oracle_slots: int = ORACLE_SLOTS_DEFAULT,
              controlled_slot: bool = False) -> VecEnv:
    """``num_envs`` PushObjects envs observed through ``input_name`` (one of :data:`INPUTS`).

    ``oracle_slots``: number of slots of the ``oracle_slots`` input. ``controlled_slot``: add
    :class:`ControlledSlotVecEnv`'s ``controlled`` cue to a slot input's features.
    """
    if controlled_slot and input_name not in SLOT_INPUTS:
        raise ValueError(f"controlled_slot: only for the slot inputs {SLOT_INPUTS}, actual input: {input_name!r}")
    if input_name not in INPUTS:
        raise ValueError(f"input: expected one of {INPUTS}, actual value: {input_name!r}")
    env_kwargs = dict(num_distractors=num_distractors, max_steps=max_steps,
                      obs_mode="pixels" if input_name in ("slots", "pixels") else "state")
    if input_name == "oracle_slots":
        env_kwargs["state_distractors"] = oracle_slots - 3
    venv = make_vec_env(ENV_ID, n_envs=num_envs, seed=seed, env_kwargs=env_kwargs,
                        wrapper_class=RGBObservation if input_name == "pixels" else None,
                        vec_env_cls=SubprocVecEnv if subproc else DummyVecEnv)
    if input_name == "slots":
        if locis is None:
            raise ValueError("input 'slots' needs the Loci-s model: pass locis=load_locis(...)")
        slots = LociSVecEnvWrapper(venv, model=locis, device=device, seed=seed)
        return ControlledSlotVecEnv(slots) if controlled_slot else slots
    if input_name == "pixels":
        return VecTransposeImage(venv)  # HWC -> CHW, as SB3 would do for the CnnPolicy
    if input_name == "oracle_slots":
        slots = OracleSlots(venv, oracle_slots, seed=seed)
        return ControlledSlotVecEnv(slots) if controlled_slot else slots
    return venv


def policy_kwargs(input_name: str, ppo: PPOConfig) -> dict[str, Any]:
    if input_name in SLOT_INPUTS:
        # Actor and critic each get an encoder, so the value loss does not shape the policy's
        # features (docs/results.md, "RL": measured on oracle slots).
        return dict(features_extractor_class=SlotSetExtractor,
                    features_extractor_kwargs=dict(features_dim=ppo.features_dim),
                    share_features_extractor=False)
    if input_name == "pixels":
        return dict(features_extractor_kwargs=dict(features_dim=ppo.features_dim))
    return {}


def evaluate_success(agent: PPO, venv: VecEnv, episodes: int, seed: int = EVAL_SEED) -> float:
    """Success rate (``info["is_success"]`` at episode end) of the deterministic policy.

    ``venv`` is re-seeded with ``seed`` first, so every call sees the same held-out episodes.
    """
    n = venv.num_envs
    wanted = np.array([(episodes + i) // n for i in range(n)])  # episodes per env, summing to `episodes`
    finished = np.zeros(n, dtype=int)
    successes: list[float] = []
    venv.seed(seed)
    obs = venv.reset()
    while (finished < wanted).any():
        actions, _ = agent.predict(obs, deterministic=True)
        obs, _, dones, infos = venv.step(actions)
        for i in np.flatnonzero(dones):
            if finished[i] < wanted[i]:
                successes.append(float(infos[i]["is_success"]))
                finished[i] += 1
    return float(np.mean(successes))


class SuccessCurveCallback(BaseCallback):
    """Success rate at step 0, every ``every`` env steps and of the final policy; a tqdm bar;
    a mid-run checkpoint (``save(self)``) at the first rollout boundary after every ``save_every`` steps.

    ``progress`` (a :meth:`progress` dict of an interrupted run) continues its curve instead of
    starting a new one.
    """

    def __init__(self, eval_env: VecEnv, every: int, episodes: int, total: int, desc: str, *,
                 save_every: int = 0, save: Callable[["SuccessCurveCallback"], None] | None = None,
                 progress: dict[str, Any] | None = None):
        super().__init__()
        self.eval_env, self.every, self.episodes = eval_env, every, episodes
        self.save_every, self.save = save_every, save
        progress = progress or {}
        self.steps: list[int] = list(progress.get("steps", []))
        self.success: list[float] = list(progress.get("success", []))
        self.next_eval = int(progress.get("next_eval", 0))
        self.seconds_before = float(progress.get("train_seconds", 0.0))
        self.resumes = int(progress.get("resumes", -1)) + 1
        self.start_time = time.time()
        self.next_save = 0
        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, mininterval=2.0)

    def progress(self) -> dict[str, Any]:
        """What a resumed run needs besides the saved policy (JSON-serialisable)."""
        return {"num_timesteps": int(self.num_timesteps), "steps": self.steps, "success": self.success,
                "next_eval": self.next_eval, "train_seconds": self.train_seconds(), "resumes": self.resumes}

    def train_seconds(self) -> float:
        """Wall-clock of training so far, over every resumed part."""
        return self.seconds_before + time.time() - self.start_time

    def evaluate(self) -> None:
        rate = evaluate_success(self.model, self.eval_env, self.episodes)
        if self.steps and self.steps[-1] == self.num_timesteps:  # the final policy replaces a point
            self.steps.pop(), self.success.pop()                # taken before the last update
        self.steps.append(int(self.num_timesteps))
        self.success.append(rate)
        self.logger.record("eval/success_rate", rate)
        self.bar.set_postfix(success=f"{rate:.2f}")
        while self.next_eval <= self.num_timesteps:
            self.next_eval += self.every

    def _on_training_start(self) -> None:
        self.bar.update(self.num_timesteps)
        self.next_save = self.num_timesteps + self.save_every
        if self.num_timesteps >= self.next_eval:  # a resumed run has its earlier points already
            self.evaluate()

    def _on_rollout_start(self) -> None:
        # Between a policy update and the next rollout nothing is half-done: the saved policy and
        # optimiser are all a resumed run needs.
        if self.save is not None and self.save_every > 0 and self.num_timesteps >= self.next_save:
            self.save(self)
            while self.next_save <= self.num_timesteps:
                self.next_save += self.save_every

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        if self.num_timesteps >= self.next_eval:
            self.evaluate()
        return True

    def _on_training_end(self) -> None:
        self.evaluate()  # the trained policy, after the last update (the saved model)
        self.bar.close()


# ---- runs ----------------------------------------------------------------------------------------

def run_key(input_name: str, seed: int) -> str:
    return f"{input_name}_seed{seed}"


def partial_paths(out: str, key: str) -> tuple[str, str]:
    """Mid-run checkpoint of one run: the policy (``.zip``) and its progress (``.json``)."""
    return os.path.join(out, "partial", f"{key}.zip"), os.path.join(out, "partial", f"{key}.json")


def load_progress(out: str, key: str, timesteps: int) -> dict[str, Any] | None:
    """The progress of an interrupted run, or ``None`` when it has no (usable) mid-run checkpoint."""
    policy_path, progress_path = partial_paths(out, key)
    if not (os.path.exists(policy_path) and os.path.exists(progress_path)):
        return None
    with open(progress_path) as f:
        progress = json.load(f)
    if not 0 < progress["num_timesteps"] < timesteps:
        return None
    return progress


def venv_options(args: argparse.Namespace, locis: torch.nn.Module | None, input_name: str) -> dict[str, Any]:
    """The :func:`make_venv` arguments every run shares (all but the input, envs, seed and distractors)."""
    return dict(max_steps=args.max_episode_steps, locis=locis, device=args.device,
                subproc=args.vec_env == "subproc", oracle_slots=args.num_slots or ORACLE_SLOTS_DEFAULT,
                controlled_slot=args.controlled_slot and input_name in SLOT_INPUTS)


def train_run(input_name: str, seed: int, args: argparse.Namespace, ppo: PPOConfig,
              locis: torch.nn.Module | None) -> dict[str, Any]:
    """Train one (input, seed) and return its entry for ``results.json`` (distractors filled later).

    Continues from the run's mid-run checkpoint when there is one (see the module docstring).
    """
    key = run_key(input_name, seed)
    policy_path, progress_path = partial_paths(args.out, key)
    progress = load_progress(args.out, key, args.timesteps)
    done = progress["num_timesteps"] if progress else 0
    # A resumed part gets fresh episodes and sampling noise: the seed moves with the steps done.
    part_seed = seed + done
    common = venv_options(args, locis, input_name)
    train_env = make_venv(input_name, args.num_envs, part_seed, num_distractors=args.train_distractors, **common)
    eval_env = make_venv(input_name, min(args.num_envs, args.eval_episodes), EVAL_SEED,
                         num_distractors=args.train_distractors, **common)
    torch.manual_seed(part_seed)
    if progress:
        agent = PPO.load(policy_path, env=train_env, device=args.device, seed=part_seed,
                         tensorboard_log=os.path.join(args.out, "tb"), verbose=args.verbose)
        # The .zip is written before the .json: a kill between the two leaves a newer policy, and
        # the step counter must follow the curve the .json holds.
        agent.num_timesteps = done
        tqdm.write(f"{key}: resuming at {done} env steps from {policy_path}")
    else:
        agent = PPO(POLICIES[input_name], train_env, policy_kwargs=policy_kwargs(input_name, ppo),
                    tensorboard_log=os.path.join(args.out, "tb"), seed=seed, device=args.device,
                    verbose=args.verbose, **ppo.sb3_kwargs(args.timesteps, args.num_envs))

    def save_partial(cb: SuccessCurveCallback) -> None:
        write_atomically(policy_path, lambda tmp: agent.save(tmp))
        write_atomically(progress_path, lambda tmp: tmp.write_text(json.dumps(cb.progress())))

    callback = SuccessCurveCallback(eval_env, args.eval_every, args.eval_episodes, args.timesteps, key,
                                    save_every=args.save_every, save=save_partial, progress=progress)
    agent.learn(total_timesteps=args.timesteps - done, callback=callback, tb_log_name=key,
                reset_num_timesteps=not progress)
    seconds = callback.train_seconds()
    model_path = os.path.join(args.out, "models", f"{key}.zip")
    write_atomically(model_path, lambda tmp: agent.save(tmp))
    train_env.close()
    eval_env.close()
    return {"input": input_name, "seed": seed, "steps": callback.steps, "success": callback.success,
            "final_success": callback.success[-1], "num_timesteps": int(agent.num_timesteps),
            "train_seconds": seconds, "steps_per_second": agent.num_timesteps / seconds,
            "resumes": callback.resumes, "model": os.path.relpath(model_path, args.out), "distractors": {}}


def evaluate_distractors(run: dict[str, Any], counts: list[int], args: argparse.Namespace,
                         locis: torch.nn.Module | None) -> None:
    """Fill ``run["distractors"][str(n)]`` for the counts not measured yet (saved model, no retraining)."""
    missing = [n for n in counts if str(n) not in run["distractors"]]
    if not missing:
        return
    agent = PPO.load(os.path.join(args.out, run["model"]), device=args.device)
    for n in missing:
        venv = make_venv(run["input"], min(args.num_envs, args.eval_episodes), EVAL_SEED, num_distractors=n,
                         **venv_options(args, locis, run["input"]))
        run["distractors"][str(n)] = evaluate_success(agent, venv, args.eval_episodes)
        venv.close()


# ---- summary, plots, table -------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds per input: curve, final success, distractors, steps to the oracle."""
    summary: dict[str, Any] = {}
    for input_name in INPUTS:
        group = [r for r in runs.values() if r["input"] == input_name]
        if not group:
            continue
        length = min(len(r["success"]) for r in group)  # seeds share the evaluation schedule
        curve = np.array([r["success"][:length] for r in group])
        final = _mean_std([r["final_success"] for r in group])
        counts = sorted({int(n) for r in group for n in r["distractors"]})
        distractors = {str(n): _mean_std([r["distractors"][str(n)] for r in group if str(n) in r["distractors"]])
                       for n in counts}
        summary[input_name] = {
            "seeds": sorted(r["seed"] for r in group),
            "steps": group[0]["steps"][:length],
            "success_mean": curve.mean(0).tolist(), "success_std": curve.std(0).tolist(),
            "final_mean": final[0], "final_std": final[1],
            "distractors": {n: {"mean": m, "std": s} for n, (m, s) in distractors.items()},
        }
    oracle = summary.get(ORACLE, {}).get("final_mean")
    for entry in summary.values():
        reached = None
        if oracle is not None:
            reached = next((s for s, m in zip(entry["steps"], entry["success_mean"]) if m >= oracle - 1e-9), None)
        entry["steps_to_oracle"] = reached
    if oracle is not None:
        summary["oracle_final"] = oracle
    return summary


def plot_learning_curves(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for input_name in INPUTS:
        if input_name not in summary:
            continue
        entry = summary[input_name]
        steps, mean, std = np.array(entry["steps"]), np.array(entry["success_mean"]), np.array(entry["success_std"])
        # The two oracles (true state, perfect slots) dashed: upper bounds, not competitors.
        ax.plot(steps, mean, marker="o", markersize=3, label=f"{input_name} (n={len(entry['seeds'])})",
                linestyle="--" if input_name in (ORACLE, "oracle_slots") else "-")
        ax.fill_between(steps, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("success rate (held-out episodes)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("PPO on PushObjects: slots vs pixels vs state")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distractors(summary: dict[str, Any], train_distractors: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ticks = {train_distractors}
    for input_name in INPUTS:
        if input_name not in summary or not summary[input_name]["distractors"]:
            continue
        items = sorted(summary[input_name]["distractors"].items(), key=lambda kv: int(kv[0]))
        x = [int(n) for n, _ in items]
        ticks.update(x)
        ax.errorbar(x, [v["mean"] for _, v in items], yerr=[v["std"] for _, v in items], marker="o",
                    capsize=3, label=input_name)
    ax.axvline(train_distractors, color="grey", linestyle=":", label="trained with")
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel("number of distractors (evaluation)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Generalisation to more distractors (no retraining)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    inputs = [i for i in INPUTS if i in summary]
    oracle = summary.get("oracle_final")
    lines = [f"# PPO on {ENV_ID}: slots vs pixels vs state", "",
             f"Budget {settings['timesteps']} env steps per run, {settings['num_envs']} envs, "
             f"trained with {settings['train_distractors']} distractors, Loci-s checkpoint "
             f"`{settings['checkpoint']}`; success rate of the deterministic policy over "
             f"{settings['eval_episodes']} held-out episodes; mean +- std over seeds."
             + (" Slot inputs with the controlled-slot cue." if settings.get("controlled_slot") else ""), "",
             "| input | seeds | final success | steps to oracle final success |", "|---|---|---|---|"]
    for i in inputs:
        e = summary[i]
        reach = "n/a (no state runs)" if oracle is None else (
            f"{e['steps_to_oracle']}" if e["steps_to_oracle"] is not None else "not reached")
        lines.append(f"| {i} | {len(e['seeds'])} | {e['final_mean']:.3f} +- {e['final_std']:.3f} | {reach} |")
    if oracle is not None:
        lines += ["", f"Oracle (state) final success: {oracle:.3f}."]
    counts = sorted({int(n) for i in inputs for n in summary[i]["distractors"]})
    if counts:
        lines += ["", "Success vs number of distractors (policies not retrained):", "",
                  "| input | " + " | ".join(f"{n} distractors" for n in counts) + " |",
                  "|---|" + "---|" * len(counts)]
        for i in inputs:
            d = summary[i]["distractors"]
            cells = [f"{d[str(n)]['mean']:.3f} +- {d[str(n)]['std']:.3f}" if str(n) in d else "-" for n in counts]
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- results file ----------------------------------------------------------------------------------

TRAINING_SETTINGS = ("timesteps", "num_envs", "checkpoint", "train_distractors", "max_episode_steps",
                     "eval_every", "eval_episodes", "warmup", "num_slots", "ppo", "controlled_slot")
"""Settings that change a run's result: a resumed ``results.json`` must have the same ones."""
SETTINGS_ADDED_LATER = {"controlled_slot": False}
"""Settings newer than some results files, with the value those files were written with."""


def load_results(path: str, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    if overwrite or not os.path.exists(path):
        return {"version": RESULTS_VERSION, "settings": settings, "runs": {}}
    with open(path) as f:
        results = json.load(f)
    old = results.get("settings", {})
    old = {k: old.get(k, SETTINGS_ADDED_LATER.get(k)) for k in TRAINING_SETTINGS}
    diffs = [f"{k}: {old[k]!r} in the file, {settings[k]!r} now" for k in TRAINING_SETTINGS if old[k] != settings[k]]
    if diffs:
        raise SystemExit(f"error: {path} was written with other settings ({'; '.join(diffs)}); use another "
                         "--out, the same settings, or --overwrite to start again")
    return results


def save_json(results: dict[str, Any], path: str) -> None:
    """Write ``results`` atomically, first merging in runs another invocation saved meanwhile.

    Several invocations may share one ``--out`` (say, slots seeds in one process, pixels in
    another): under an exclusive lock the file on disk is re-read and its runs that ``results``
    does not have are kept, so no process overwrites another's finished runs.
    """
    import fcntl

    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            with open(path) as f:
                on_disk = json.load(f).get("runs", {})
            for key, run in on_disk.items():
                results["runs"].setdefault(key, run)

        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)

        write_atomically(path, write)


# ---- command line ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m locis_rl.rl.compare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS, help="observation types")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--timesteps", type=int, default=250_000, help="env steps per run (every input)")
    p.add_argument("--num-envs", type=int, default=8, help="parallel training envs")
    p.add_argument("--checkpoint", default="default",
                   help="Loci-s weights: a checkpoint path, 'default' or 'tiny' (random weights, smoke tests)")
    p.add_argument("--warmup", type=int, default=0,
                   help="slot warm-up iterations on the first frame (0: the checkpoint's own)")
    # The training scene holds goal patch + target + pusher + 3 distractors = 6 things: with the
    # checkpoint's 6 slots one spurious slot leaves the pusher out (its pixels under a slot: 0.76
    # with 6 slots, 0.93 with 8).
    p.add_argument("--num-slots", type=int, default=8,
                   help="slots of the Loci-s wrapper (0: the checkpoint's own; the shipped one has 6) and "
                        f"of oracle_slots (0: {ORACLE_SLOTS_DEFAULT}; at least 3)")
    p.add_argument("--controlled-slot", action="store_true",
                   help="slot inputs: add the controlled-slot cue (ControlledSlotVecEnv) to the features")
    p.add_argument("--device", default="auto", help="device of Loci-s and of the policies: auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default="runs/rl_compare", help="output folder")
    p.add_argument("--train-distractors", type=int, default=3)
    p.add_argument("--eval-distractors", nargs="+", type=int, default=[3, 6, 10],
                   help="distractor counts of the final evaluation")
    p.add_argument("--eval-every", type=int, default=None, help="env steps between evaluations "
                   "(default: timesteps / 10)")
    p.add_argument("--eval-episodes", type=int, default=20, help="held-out episodes per evaluation")
    p.add_argument("--save-every", type=int, default=None, help="env steps between mid-run checkpoints "
                   "(default: one rollout, n_steps x num-envs, so a killed run loses at most one rollout; "
                   "0: none)")
    p.add_argument("--max-episode-steps", type=int, default=100, help="episode length before truncation")
    p.add_argument("--vec-env", default="dummy", choices=["dummy", "subproc"], help="SB3 VecEnv class")
    p.add_argument("--ppo", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"override PPO settings, e.g. n_steps=256 (fields: "
                        f"{', '.join(f.name for f in dataclasses.fields(PPOConfig))})")
    p.add_argument("--verbose", type=int, default=0, help="SB3 verbosity (1: rollout/train tables)")
    p.add_argument("--overwrite", action="store_true", help="ignore an existing results.json")
    p.add_argument("--progress-report", action="store_true",
                   help="train nothing: write the curves so far (finished runs and the mid-run checkpoints "
                        "of runs still going) to progress.md / learning_curves_progress.png")
    return p


def progress_runs(results: dict[str, Any], out: str, todo: list[tuple[str, int]], timesteps: int
                  ) -> dict[str, dict[str, Any]]:
    """The finished runs of ``todo`` and, for the unfinished ones, their curves so far.

    An unfinished run's entry has ``in_progress: True``, ``final_success`` = its last evaluation
    and no distractor figures; runs without any evaluation yet are left out.
    """
    runs: dict[str, dict[str, Any]] = {}
    for input_name, seed in todo:
        key = run_key(input_name, seed)
        if key in results["runs"]:
            runs[key] = results["runs"][key]
            continue
        progress = load_progress(out, key, timesteps)
        if progress and progress["success"]:
            runs[key] = {"input": input_name, "seed": seed, "steps": progress["steps"],
                         "success": progress["success"], "final_success": progress["success"][-1],
                         "num_timesteps": progress["num_timesteps"], "distractors": {}, "in_progress": True}
    return runs


def write_progress_report(runs: dict[str, dict[str, Any]], settings: dict[str, Any], out: str) -> str:
    """``progress.md`` + ``learning_curves_progress.png`` in ``out``; returns the markdown."""
    summary = summarise(runs)
    plot_learning_curves(summary, os.path.join(out, "learning_curves_progress.png"))
    going = [f"{k} at {r['num_timesteps']} env steps" for k, r in sorted(runs.items()) if r.get("in_progress")]
    table = markdown_table(summary, settings)
    table += ("\nIn progress (their \"final success\" is the last evaluation so far; curves are cut to the "
              "shortest run of each input): " + ", ".join(going) + ".\n") if going else ""
    with open(os.path.join(out, "progress.md"), "w") as f:
        f.write(table)
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("timesteps", "num_envs", "eval_episodes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}: expected a positive int, actual value: "
                             f"{getattr(args, name)}")
    if args.num_slots < 0:
        raise SystemExit(f"error: --num-slots: expected 0 (the checkpoint's own) or a positive int, actual "
                         f"value: {args.num_slots}")
    if "oracle_slots" in args.inputs and 0 < args.num_slots < 3:
        raise SystemExit(f"error: --num-slots: oracle_slots needs at least 3 slots (pusher, target, goal), "
                         f"actual value: {args.num_slots}")
    args.device = cli_device(args.device)
    args.eval_every = args.eval_every or max(1, args.timesteps // 10)
    try:
        ppo = PPOConfig.from_overrides(args.ppo)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.save_every is None:  # a checkpoint is ~2 MB and a rollout minutes of a slots run: save each
        args.save_every = ppo.sb3_kwargs(args.timesteps, args.num_envs)["n_steps"] * args.num_envs
    os.makedirs(os.path.join(args.out, "models"), exist_ok=True)
    settings = {"env": ENV_ID, "timesteps": args.timesteps, "num_envs": args.num_envs,
                "checkpoint": args.checkpoint, "train_distractors": args.train_distractors,
                "max_episode_steps": args.max_episode_steps, "eval_every": args.eval_every,
                "eval_episodes": args.eval_episodes, "warmup": args.warmup, "num_slots": args.num_slots,
                "ppo": dataclasses.asdict(ppo), "eval_seed": EVAL_SEED, "controlled_slot": args.controlled_slot}
    results_path = os.path.join(args.out, "results.json")
    results = load_results(results_path, settings, args.overwrite)
    runs = results["runs"]

    todo = [(i, s) for i in args.inputs for s in args.seeds]
    if args.progress_report:
        runs_so_far = progress_runs(results, args.out, todo, args.timesteps)
        if not runs_so_far:
            raise SystemExit(f"error: no finished run and no evaluated mid-run checkpoint in {args.out} for "
                             f"{', '.join(run_key(i, s) for i, s in todo)}")
        print(write_progress_report(runs_so_far, settings, args.out))
        return 0
    pending = [(i, s) for i, s in todo if run_key(i, s) not in runs]
    needs_locis = any(i == "slots" and (run_key(i, s) not in runs or any(
        str(n) not in runs[run_key(i, s)]["distractors"] for n in args.eval_distractors)) for i, s in todo)
    try:
        locis = load_locis(args.checkpoint, args.warmup, args.num_slots) if needs_locis else None
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    skipped = len(todo) - len(pending)
    resumable = sum(load_progress(args.out, run_key(i, s), args.timesteps) is not None for i, s in pending)
    print(f"{len(todo)} runs: {skipped} already in {results_path} (skipped), {len(pending)} to train "
          f"({resumable} resumed from a mid-run checkpoint)", flush=True)

    for input_name, seed in tqdm(todo, desc="runs", unit="run", dynamic_ncols=True):
        key = run_key(input_name, seed)
        if key not in runs:
            runs[key] = train_run(input_name, seed, args, ppo, locis)
            tqdm.write(f"{key}: final success {runs[key]['final_success']:.3f} after "
                       f"{runs[key]['num_timesteps']} steps ({runs[key]['steps_per_second']:.0f} steps/s)")
            save_json(results, results_path)
            for path in partial_paths(args.out, key):  # the run is complete: its mid-run state is stale
                Path(path).unlink(missing_ok=True)
        evaluate_distractors(runs[key], args.eval_distractors, args, locis)
        save_json(results, results_path)

    selected = {run_key(i, s): runs[run_key(i, s)] for i, s in todo}
    summary = summarise(selected)
    results["summary"] = summary
    save_json(results, results_path)
    plot_learning_curves(summary, os.path.join(args.out, "learning_curves.png"))
    plot_distractors(summary, args.train_distractors, os.path.join(args.out, "distractors.png"))
    table = markdown_table(summary, settings)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
