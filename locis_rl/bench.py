"""Benchmarks: ``python -m locis_rl.bench <subcommand>``.

Subcommands:
    model     step latency of :class:`locis_rl.model.LociS` per preset / device / batch size.
    wrapper   env steps/s of ``locis/PushObjects-v0``, raw pixels vs Loci-s slot features
              (``LociSWrapper`` for one env, ``LociSVectorWrapper`` over a vector env).

Example:
    python -m locis_rl.bench model --presets tiny --batch-sizes 1 16 --steps 5
    python -m locis_rl.bench wrapper --checkpoint tiny --num-envs 1 8 --steps 50

Add a subcommand by writing ``_add_<name>_parser(subparsers)`` that sets ``func`` and listing it
in :data:`SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

__all__ = ["main", "bench_model", "bench_wrapper", "SUBCOMMANDS"]


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return name


def bench_model(preset: str, device: str, batch_size: int, *, steps: int = 5, warmup_steps: int = 1,
                mode: str = "seg", compile: bool = False, seed: int = 0,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Median latency of :meth:`LociS.step` on random frames (eval, ``torch.inference_mode``).

    The first frame of a row runs the slot-assignment warm-up; it and ``warmup_steps`` further
    steps are excluded, so the figure is the steady-state per-step latency.

    Returns:
        dict(preset, device, batch, mode, latency_ms, frames_per_s, params_m, first_step_ms, steps).
    """
    import torch

    from locis_rl.model import LociS

    torch.manual_seed(seed)
    model = LociS(preset).to(device).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    cfg = model.config
    s = cfg.image_size
    step = torch.compile(model.step) if compile else model.step
    frames = torch.rand(batch_size, 3, s, s, device=device)
    depth = torch.rand(batch_size, 1, s, s, device=device) + 0.5 if cfg.use_depth else None

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times: list[float] = []
    with torch.inference_mode():
        state = model.init_state(batch_size, device, seed=seed)
        t0 = time.perf_counter()
        _, state = step(frames, depth, state, mode=mode)
        sync()
        first = time.perf_counter() - t0
        if log:
            log(f"  {preset} {device} batch {batch_size}: first step (with warm-up) {first * 1e3:.0f} ms")
        for i in range(warmup_steps + steps):
            frames = (frames + 0.01 * torch.randn_like(frames)).clamp(0, 1)
            sync()
            t0 = time.perf_counter()
            _, state = step(frames, depth, state, mode=mode)
            sync()
            if i >= warmup_steps:
                times.append(time.perf_counter() - t0)
                if log:
                    log(f"  {preset} {device} batch {batch_size}: step {i - warmup_steps + 1}/{steps} "
                        f"{times[-1] * 1e3:.0f} ms")
    latency = statistics.median(times)
    return {"preset": preset, "device": device, "batch": batch_size, "mode": mode,
            "latency_ms": latency * 1e3, "frames_per_s": batch_size / latency, "params_m": params,
            "first_step_ms": first * 1e3, "steps": steps}


def _format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'preset':<8} {'device':<6} {'batch':>5} {'latency ms':>11} {'frames/s':>9} {'params M':>9} {'first ms':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['preset']:<8} {r['device']:<6} {r['batch']:>5} {r['latency_ms']:>11.1f} "
                     f"{r['frames_per_s']:>9.2f} {r['params_m']:>9.2f} {r['first_step_ms']:>9.0f}")
    return "\n".join(lines)


def _run_model(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    rows = []
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    for preset in args.presets:
        for batch in args.batch_sizes:
            rows.append(bench_model(preset, device, batch, steps=args.steps, warmup_steps=args.warmup_steps,
                                    mode=args.mode, compile=args.compile, seed=args.seed, log=log))
    print(f"LociS.step latency (eval, inference_mode, mode={args.mode}, median of {args.steps} steps, "
          f"warm-up excluded)")
    print(_format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _add_model_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("model", help="LociS.step latency per preset / device / batch size",
                              description="Median LociS.step latency (model.eval(), torch.inference_mode, "
                                          "first-frame warm-up excluded).")
    p.add_argument("--presets", nargs="+", default=["tiny"], help="model presets (default: tiny)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16], help="batch sizes (default: 1 16)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--compile", action="store_true", help="torch.compile the step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (default: 5)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps after the first frame")
    p.add_argument("--mode", default="seg", choices=["rnd", "reg", "seg"], help="slot assignment mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run_model)


# ---- wrapper ------------------------------------------------------------------------------------

WRAPPER_ENV = "locis/PushObjects-v0"


def _load_locis(checkpoint: str, warmup: int = 0) -> Any:
    """``"tiny"`` (random weights, seed 0), ``"default"`` or a checkpoint path; eval mode, frozen."""
    import torch

    from locis_rl.model import LociS
    from locis_rl.rl.perception import load_model

    if checkpoint == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LociS("tiny")
    else:
        model = load_model(checkpoint)  # FileNotFoundError says how to get a checkpoint
    if warmup > 0:
        model.config.assignment.warmup_inference = warmup
    return model.eval().requires_grad_(False)


def _make_env(num_envs: int, vector: str, env_kwargs: dict[str, Any]) -> Any:
    import gymnasium as gym

    import envs  # noqa: F401  (registers locis/..., headless MuJoCo GL)

    if num_envs == 1 and vector == "none":
        return gym.make(WRAPPER_ENV, **env_kwargs)
    fns = [lambda: gym.make(WRAPPER_ENV, **env_kwargs) for _ in range(num_envs)]
    if vector == "async":
        return gym.vector.AsyncVectorEnv(fns, context="spawn")
    return gym.vector.SyncVectorEnv(fns)


def _time_steps(env: Any, steps: int, warmup_steps: int, seed: int, single: bool) -> float:
    """Mean seconds per ``env.step`` over ``steps`` timed steps (episode resets included as they happen)."""
    env.action_space.seed(seed)
    env.reset(seed=seed)
    elapsed = 0.0
    for i in range(warmup_steps + steps):
        action = env.action_space.sample()
        t0 = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        if single and (terminated or truncated):
            env.reset()
        if i >= warmup_steps:
            elapsed += time.perf_counter() - t0
    return elapsed / steps


def bench_wrapper(model: Any, num_envs: int, *, vector: str = "sync", device: str = "cpu", steps: int = 20,
                  warmup_steps: int = 2, seed: int = 0, env_kwargs: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Env steps/s of PushObjects with pixel observations (raw) and with slot features (wrapped).

    ``num_envs == 1`` uses a plain env and :class:`LociSWrapper` (``vector="none"``); more envs a
    Gymnasium ``SyncVectorEnv`` / ``AsyncVectorEnv`` and :class:`LociSVectorWrapper` (one batched model
    step for all envs). The first ``warmup_steps`` steps after the reset (whose first frame runs the
    slot warm-up) are not timed; later episode resets are.

    Returns:
        dict(env, num_envs, vector, device, raw_steps_per_s, wrapped_steps_per_s, overhead_ms, steps),
        steps/s counting every env's step; ``overhead_ms`` is the extra time of one (vector) step.
    """
    from locis_rl.rl import LociSVectorWrapper, LociSWrapper

    env_kwargs = dict(env_kwargs or {})
    if num_envs == 1:
        vector = "none"
    raw = _make_env(num_envs, vector, env_kwargs)
    raw_s = _time_steps(raw, steps, warmup_steps, seed, single=vector == "none")
    raw.close()
    base = _make_env(num_envs, vector, env_kwargs)
    wrapper = LociSWrapper if vector == "none" else LociSVectorWrapper
    wrapped = wrapper(base, model=model, device=device, seed=seed)
    wrapped_s = _time_steps(wrapped, steps, warmup_steps, seed, single=vector == "none")
    wrapped.close()
    return {"env": WRAPPER_ENV, "num_envs": num_envs, "vector": vector, "device": str(device),
            "raw_steps_per_s": num_envs / raw_s, "wrapped_steps_per_s": num_envs / wrapped_s,
            "overhead_ms": (wrapped_s - raw_s) * 1e3, "steps": steps}


def _format_wrapper_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'env':<22} {'num_envs':>8} {'vector':<6} {'raw steps/s':>12} {'wrapped steps/s':>16} "
              f"{'overhead ms/step':>17}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['env']:<22} {r['num_envs']:>8} {r['vector']:<6} {r['raw_steps_per_s']:>12.1f} "
                     f"{r['wrapped_steps_per_s']:>16.1f} {r['overhead_ms']:>17.1f}")
    return "\n".join(lines)


def _run_wrapper(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    try:
        model = _load_locis(args.checkpoint, args.warmup)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    env_kwargs = {"num_distractors": args.num_distractors}
    rows = []
    for n in args.num_envs:
        for vector in (["none"] if n == 1 else args.vector):
            if not args.quiet:
                print(f"  {n} env(s), {vector}: timing {args.steps} steps raw and wrapped ...", file=sys.stderr,
                      flush=True)
            rows.append(bench_wrapper(model, n, vector=vector, device=device, steps=args.steps,
                                      warmup_steps=args.warmup_steps, seed=args.seed, env_kwargs=env_kwargs))
    if args.json == "-":
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{WRAPPER_ENV} env steps/s (all envs), pixel obs raw vs Loci-s slot features "
          f"(checkpoint {args.checkpoint}, {device}, mean of {args.steps} steps, {args.warmup_steps} untimed)")
    print(_format_wrapper_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _add_wrapper_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("wrapper", help="PushObjects env steps/s: raw pixels vs Loci-s wrappers",
                              description="Env steps/s of locis/PushObjects-v0 with pixel observations (no "
                                          "model) and wrapped with LociSWrapper (1 env) / "
                                          "LociSVectorWrapper (vector envs), and the overhead per step.")
    p.add_argument("--checkpoint", default="default",
                   help="Loci-s weights: 'tiny' (random weights), 'default' or a checkpoint path")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--steps", type=int, default=50, help="timed steps per setting (default: 50)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps after the first reset")
    p.add_argument("--num-envs", nargs="+", type=int, default=[1, 8], help="env counts (default: 1 8)")
    p.add_argument("--vector", nargs="+", default=["sync"], choices=["sync", "async"],
                   help="vector env classes for num_envs > 1 (default: sync; async spawns one process per env)")
    p.add_argument("--warmup", type=int, default=0,
                   help="slot warm-up iterations on a first frame (0: the checkpoint's own)")
    p.add_argument("--num-distractors", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="write the rows to this JSON file; without a file name, print JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run_wrapper)


SUBCOMMANDS = [_add_model_parser, _add_wrapper_parser]
"""Parser builders, one per subcommand."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m locis_rl.bench", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
