"""PPO (TorchRL) on ``locis/PushObjects-v0`` from frozen Loci-s slot features.

``LociSTransform`` sits on the outer batched env, so one Loci-s step serves every env of the
``SerialEnv`` / ``ParallelEnv``; its recurrent slot state travels in the tensordict under
``"locis"``. The actor and the critic are slot-set networks (``make_slot_actor`` /
``make_slot_value``) reading ``slot_gestalt``, ``slot_position``, ``slot_depth`` and ``slot_presence``.
Before a batch goes to the replay buffer its pixels and the slot state are dropped (an inverse
``ExcludeTransform`` on the buffer): PPO needs only the features, and the state is large.

Usage:
    python examples/ppo_torchrl_push.py --checkpoint tiny --total-frames 256   # smoke test
    python examples/ppo_torchrl_push.py --checkpoint default --num-envs 8 --total-frames 250000
    python examples/ppo_torchrl_push.py --help                                  # every option

Outputs (``<output-dir>/<exp-name>__<seed>__<time>/``): TensorBoard scalars and ``policy.pt``
(the actor's state dict).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import time
from dataclasses import dataclass

import envs  # noqa: F401  (first: registers locis/... and picks headless MuJoCo GL before TorchRL imports mujoco)
import numpy as np
import torch
from tensordict.nn import set_interaction_type
from torch.utils.tensorboard import SummaryWriter
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.envs import (Compose, EnvBase, ExcludeTransform, GymEnv, ParallelEnv, RewardSum,
                          SerialEnv, StepCounter, TransformedEnv)
from torchrl.envs.utils import ExplorationType
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

try:  # TorchRL >= 0.14 names the single-process collector `Collector`
    from torchrl.collectors import Collector
except ImportError:  # pragma: no cover - older TorchRL
    from torchrl.collectors import SyncDataCollector as Collector

from locis_rl.rl.perception import load_locis
from locis_rl.rl.torchrl import LociSTransform, make_slot_actor, make_slot_value

STATE_KEY = "locis"
"""Where LociSTransform keeps the recurrent slot state in the tensordict."""
SUCCESS_KEY = ("next", "terminated")
"""PushObjects terminates exactly when the target enters the goal (its ``info["is_success"]``)."""


@dataclass
class Args:
    exp_name: str = "ppo_torchrl_push"
    """name of the experiment (prefix of the run folder)"""
    seed: int = 1
    """seed of the envs, the networks and the slot-state streams"""
    checkpoint: str = "default"
    """Loci-s weights: a checkpoint path, "default" (the shipped one) or "tiny" (random weights, smoke tests)"""
    device: str = "auto"
    """device of the Loci-s model: auto, cpu or cuda (the PPO networks stay on the CPU)"""
    warmup: int = 0
    """slot warm-up iterations on the first frame of an episode (0: keep the checkpoint's value)"""
    num_slots: int = 8
    """slots per frame (0: the checkpoint's own, 6 for the shipped one); the scene holds goal patch,
    target, pusher and 3 distractors, so 8 leaves room for a spurious slot"""

    # environment
    num_envs: int = 4
    """number of envs in the batched env (one Loci-s step serves all of them)"""
    parallel: bool = False
    """step the envs in worker processes (ParallelEnv) instead of in this process (SerialEnv)"""
    num_distractors: int = 3
    """distractor objects on the table"""
    max_episode_steps: int = 100
    """episode length before truncation"""

    # PPO
    total_frames: int = 100_000
    """total env steps of training"""
    frames_per_batch: int = 2048
    """env steps collected per PPO update (over all envs)"""
    minibatch_size: int = 256
    """minibatch size"""
    update_epochs: int = 10
    """passes over each batch"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
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
    hidden: int = 128
    """width of the slot-set actor and critic"""

    # evaluation and outputs
    eval_episodes: int = 10
    """episodes of the final deterministic evaluation (held-out env seeds, one env each)"""
    output_dir: str = "runs"
    """where the run folder (TensorBoard logs, policy.pt) is written"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args` (``--num-envs 8``, ``--no-parallel``)."""
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


def make_env(args: Args, model: torch.nn.Module, num_envs: int, seed: int) -> TransformedEnv:
    """``num_envs`` batched envs -> slot features (one batched Loci-s step), step count, return."""
    batched = ParallelEnv if args.parallel else SerialEnv
    base = batched(num_envs, lambda: GymEnv("locis/PushObjects-v0", num_distractors=args.num_distractors,
                                            max_steps=args.max_episode_steps))
    env = TransformedEnv(base, Compose(
        LociSTransform(model, device=args.device, seed=seed, state_key=STATE_KEY),
        StepCounter(),
        RewardSum(),
    ))
    env.set_seed(seed)
    return env


def evaluate(actor, env: EnvBase, max_episode_steps: int) -> float:
    """Success rate of the deterministic policy over the first episode of every env of ``env``."""
    with torch.no_grad(), set_interaction_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(max_episode_steps, actor, break_when_any_done=False)
    done = rollout["next", "done"].squeeze(-1)            # [N, T]; every env ends within T steps
    first_end = done.float().argmax(dim=1)                # step of each env's first episode end
    success = rollout[SUCCESS_KEY].squeeze(-1)[torch.arange(done.shape[0]), first_end]
    return success.float().mean().item()


if __name__ == "__main__":
    args = parse_args()
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{key}|{value}|" for key, value in vars(args).items()))
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- perception and envs ----------------------------------------------------------------
    locis = load_locis(args.checkpoint, args.warmup, args.num_slots, seed=None)  # tiny: from the seed above
    env = make_env(args, locis, args.num_envs, seed=args.seed)
    print("slot features:", {key: tuple(env.observation_spec[key].shape) for key in
                             ("slot_gestalt", "slot_position", "slot_depth", "slot_presence")})

    # ---- agent -------------------------------------------------------------------------------
    actor = make_slot_actor(env, features_dim=args.hidden, hidden=args.hidden)
    critic = make_slot_value(env, features_dim=args.hidden, hidden=args.hidden)
    advantage = GAE(gamma=args.gamma, lmbda=args.gae_lambda, value_network=critic, average_gae=True)
    loss_module = ClipPPOLoss(actor, critic, clip_epsilon=args.clip_coef, entropy_bonus=args.ent_coef > 0,
                              entropy_coeff=args.ent_coef, critic_coeff=args.vf_coef,
                              loss_critic_type="l2")
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=args.learning_rate, eps=1e-5)

    # ---- data --------------------------------------------------------------------------------
    frames_per_batch = min(args.frames_per_batch, args.total_frames)
    frames_per_batch -= frames_per_batch % args.num_envs  # whole steps of the batched env
    collector = Collector(env, actor, frames_per_batch=frames_per_batch, total_frames=args.total_frames)
    # Pixels and slot state are not needed for the PPO update: drop them when the batch is written.
    dropped = [STATE_KEY, "rgb", "depth"]
    buffer = ReplayBuffer(storage=LazyTensorStorage(frames_per_batch), sampler=SamplerWithoutReplacement(),
                          batch_size=min(args.minibatch_size, frames_per_batch),
                          transform=ExcludeTransform(*dropped, *[("next", k) for k in dropped], inverse=True))

    # ---- training ----------------------------------------------------------------------------
    start, frames, update = time.time(), 0, 0
    for data in collector:
        frames += data.numel()
        ended = data["next", "done"]
        if ended.any():
            writer.add_scalar("charts/episodic_return", data["next", "episode_reward"][ended].mean().item(), frames)
            writer.add_scalar("charts/success_rate", data[SUCCESS_KEY][ended].float().mean().item(), frames)
            writer.add_scalar("charts/episodic_length", data["next", "step_count"][ended].float().mean().item(), frames)

        for _ in range(args.update_epochs):
            with torch.no_grad():
                advantage(data)  # values and advantages with the current critic
            buffer.empty()
            buffer.extend(data.reshape(-1))
            for minibatch in buffer:
                losses = loss_module(minibatch)
                loss = losses["loss_objective"] + losses["loss_critic"] + losses.get("loss_entropy", 0.0)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(loss_module.parameters(), args.max_grad_norm)
                optimizer.step()
        update += 1

        sps = frames / (time.time() - start)
        writer.add_scalar("losses/policy_loss", losses["loss_objective"].item(), frames)
        writer.add_scalar("losses/value_loss", losses["loss_critic"].item(), frames)
        writer.add_scalar("charts/SPS", sps, frames)
        print(f"update {update}: frames {frames}, policy loss {losses['loss_objective'].item():.4f}, "
              f"value loss {losses['loss_critic'].item():.4f}, SPS {sps:.1f}")
    collector.shutdown()

    # ---- evaluation on held-out env seeds ------------------------------------------------------
    env_eval = make_env(args, locis, args.eval_episodes, seed=10_000 + args.seed)
    success = evaluate(actor, env_eval, args.max_episode_steps)
    writer.add_scalar("eval/success_rate", success, frames)
    print(f"eval/success_rate: {success:.3f} ({args.eval_episodes} episodes)")

    path = os.path.join(run_dir, "policy.pt")
    torch.save(actor.state_dict(), path)
    print(f"saved the actor to {path}")
    env_eval.close()  # the collector's shutdown closed the training env
    writer.close()
