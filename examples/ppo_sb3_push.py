"""PPO (Stable-Baselines3) on ``locis/PushObjects-v0`` from frozen Loci-s slot features.

The env renders RGB-D frames; ``LociSVecEnvWrapper`` runs the Loci-s model once per env step,
batched over all envs on the env side, and hands PPO a Dict of per-slot features
(gestalt, position, depth, presence). The policy reads them with ``SlotSetExtractor``, a
permutation-invariant set encoder, so PPO never sees pixels and never re-runs the perception
per minibatch.

Usage:
    python examples/ppo_sb3_push.py --checkpoint tiny --total-timesteps 256   # smoke test
    python examples/ppo_sb3_push.py --checkpoint default --num-envs 8 --total-timesteps 250000
    python examples/ppo_sb3_push.py --checkpoint default --num-envs 8 --total-timesteps 500000 --controlled-slot
    python examples/ppo_sb3_push.py --help                                     # every option

Outputs (``<output-dir>/<exp-name>__<seed>__<time>/``): TensorBoard logs and ``policy.zip``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

import envs  # noqa: F401  (registers the locis/... env ids)
from locis_rl.rl.perception import load_locis
from locis_rl.rl.sb3 import ControlledSlotVecEnv, LociSVecEnvWrapper, SlotSetExtractor


@dataclass
class Args:
    exp_name: str = "ppo_sb3_push"
    """name of the experiment (prefix of the run folder)"""
    seed: int = 1
    """seed of the envs, the policy and the slot-state streams"""
    checkpoint: str = "default"
    """Loci-s weights: a checkpoint path, "default" (the shipped one) or "tiny" (random weights, smoke tests)"""
    device: str = "auto"
    """device of the Loci-s model and of the policy: auto, cpu or cuda"""
    warmup: int = 0
    """slot warm-up iterations on the first frame of an episode (0: keep the checkpoint's value)"""
    num_slots: int = 8
    """slots per frame (0: the checkpoint's own, 6 for the shipped one); the scene holds goal patch,
    target, pusher and 3 distractors, so 8 leaves room for a spurious slot"""
    controlled_slot: bool = False
    """add a `controlled` feature: 1 on the slot whose motion the actions explain best (the pusher's
    in ~86 % of the shipped checkpoint's frames; docs/results.md, "Which slot do I move?")"""

    # environment
    num_envs: int = 4
    """number of parallel envs (one batched Loci-s step serves all of them)"""
    subproc: bool = False
    """step the envs in subprocesses (SubprocVecEnv) instead of in this process (DummyVecEnv)"""
    num_distractors: int = 3
    """distractor objects on the table"""
    max_episode_steps: int = 100
    """episode length before truncation"""

    # PPO
    total_timesteps: int = 100_000
    """total env steps of training"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    num_steps: int = 512
    """env steps per env in each rollout"""
    batch_size: int = 256
    """minibatch size"""
    update_epochs: int = 10
    """passes over each rollout"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    clip_coef: float = 0.2
    """PPO clipping coefficient"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    features_dim: int = 128
    """output size of the slot-set features extractor"""

    # evaluation and outputs
    eval_episodes: int = 10
    """episodes of the final deterministic evaluation (held-out env seeds)"""
    output_dir: str = "runs"
    """where the run folder (TensorBoard logs, policy.zip) is written"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args` (``--num-envs 8``, ``--no-subproc``)."""
    docs, tree = {}, ast.parse(inspect.getsource(Args))
    body = tree.body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
            docs[node.target.id] = after.value.value
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Args):
        flag, default = "--" + field.name.replace("_", "-"), field.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=docs.get(field.name))
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"{docs.get(field.name, '')} (default: {default})")
    return Args(**vars(parser.parse_args()))


def make_env(args: Args, model: torch.nn.Module, num_envs: int, seed: int) -> VecEnv:
    """``num_envs`` PushObjects envs, their pixels turned into slot features on the env side."""
    venv = make_vec_env("locis/PushObjects-v0", n_envs=num_envs, seed=seed,
                        env_kwargs=dict(num_distractors=args.num_distractors,
                                        max_steps=args.max_episode_steps),
                        vec_env_cls=SubprocVecEnv if args.subproc else DummyVecEnv)
    slots = LociSVecEnvWrapper(venv, model=model, device=args.device, seed=seed)
    return ControlledSlotVecEnv(slots) if args.controlled_slot else slots


def evaluate(agent: PPO, venv: VecEnv, episodes: int, seed: int) -> float:
    """Success rate of the deterministic policy over ``episodes`` episodes spread over the envs."""
    n = venv.num_envs
    wanted = np.array([(episodes + i) // n for i in range(n)])  # episodes per env, summing to `episodes`
    done_episodes = np.zeros(n, dtype=int)
    successes: list[float] = []
    venv.seed(seed)
    obs = venv.reset()
    while (done_episodes < wanted).any():
        actions, _ = agent.predict(obs, deterministic=True)
        obs, _, dones, infos = venv.step(actions)
        for i in np.flatnonzero(dones):
            if done_episodes[i] < wanted[i]:
                successes.append(float(infos[i]["is_success"]))
                done_episodes[i] += 1
    return float(np.mean(successes))


if __name__ == "__main__":
    args = parse_args()
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- perception and envs ----------------------------------------------------------------
    locis = load_locis(args.checkpoint, args.warmup, args.num_slots, seed=None)  # tiny: from the seed above
    envs_train = make_env(args, locis, args.num_envs, seed=args.seed)
    print(f"slot features: {envs_train.observation_space}")

    # ---- agent -------------------------------------------------------------------------------
    # A rollout never holds more steps than the whole budget (tiny smoke runs stay tiny).
    num_steps = max(1, min(args.num_steps, args.total_timesteps // args.num_envs))
    agent = PPO(
        "MultiInputPolicy",
        envs_train,
        learning_rate=args.learning_rate,
        n_steps=num_steps,
        batch_size=min(args.batch_size, num_steps * args.num_envs),
        n_epochs=args.update_epochs,
        gamma=args.gamma,
        gae_lambda=args.gae_lambda,
        clip_range=args.clip_coef,
        ent_coef=args.ent_coef,
        vf_coef=args.vf_coef,
        max_grad_norm=args.max_grad_norm,
        # Actor and critic get their own slot encoder: a shared one is shaped by the value loss.
        policy_kwargs=dict(features_extractor_class=SlotSetExtractor,
                           features_extractor_kwargs=dict(features_dim=args.features_dim),
                           share_features_extractor=False,
                           net_arch=dict(pi=[128], vf=[128])),
        tensorboard_log=run_dir,
        seed=args.seed,
        device=args.device,
        verbose=1,
    )

    # ---- training ----------------------------------------------------------------------------
    start = time.time()
    agent.learn(total_timesteps=args.total_timesteps, tb_log_name="ppo")
    print(f"charts/SPS: {agent.num_timesteps / (time.time() - start):.1f}")

    # ---- evaluation on held-out env seeds ------------------------------------------------------
    envs_eval = make_env(args, locis, min(args.num_envs, args.eval_episodes), seed=10_000 + args.seed)
    success = evaluate(agent, envs_eval, args.eval_episodes, seed=10_000 + args.seed)
    print(f"eval/success_rate: {success:.3f} ({args.eval_episodes} episodes)")

    path = os.path.join(run_dir, "policy.zip")
    agent.save(path)
    print(f"saved the policy to {path}")
    envs_train.close()
    envs_eval.close()
