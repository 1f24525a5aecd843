"""Benchmarks: ``python -m locis_rl.bench <subcommand>``.

Subcommands:
    model     step latency of :class:`locis_rl.model.LociS` per preset / device / batch size.
    wrapper   env steps/s of ``locis/PushObjects-v0``, raw pixels vs Loci-s slot features
              (``LociSWrapper`` for one env, ``LociSVectorWrapper`` over a vector env).
    memory    memory growth (process RSS, CUDA memory) over a long ``LociSVectorWrapper`` run
              (default 10^5 env steps) with a ``growth`` / ``no growth`` verdict.

Example:
    python -m locis_rl.bench model --presets tiny --batch-sizes 1 16 --steps 5
    python -m locis_rl.bench wrapper --checkpoint tiny --num-envs 1 8 --steps 50
    python -m locis_rl.bench memory --device cpu --out runs/bench_memory

Add a subcommand by writing ``_add_<name>_parser(subparsers)`` that sets ``func`` and listing it
in :data:`SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from locis_rl.atomic_files import write_atomically
from locis_rl.devices import cli_device

__all__ = ["main", "bench_model", "bench_wrapper", "bench_memory", "memory_verdict", "least_squares_slope",
           "process_rss_mb", "SUBCOMMANDS"]


def bench_model(preset: str, device: str, batch_size: int, *, steps: int = 5, warmup_steps: int = 1,
                mode: str = "seg", compile: bool = False, seed: int = 0, reconstruct_rgb: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Median latency of :meth:`LociS.step` on random frames (eval, ``torch.inference_mode``).

    ``reconstruct_rgb=False`` times the step as the RL adapters run it (no RGB reconstruction of
    the current frame).

    The first frame of a row runs the slot-assignment warm-up; it and ``warmup_steps`` further
    steps are excluded, so the figure is the steady-state per-step latency.

    Returns:
        dict(preset, device, batch, mode, latency_ms, frames_per_s, params_m, first_step_ms, steps).
    """
    import torch

    from locis_rl.model import LociS
    from locis_rl.model.locis import pretrained_checkpoint

    torch.manual_seed(seed)
    # "default" / "depth" / a file: a trained checkpoint's architecture (latency does not depend on weights)
    model = (LociS.from_pretrained(preset) if pretrained_checkpoint(preset) or os.path.isfile(preset)
             else LociS(preset)).to(device).eval()
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
        _, state = step(frames, depth, state, mode=mode, reconstruct_rgb=reconstruct_rgb)
        sync()
        first = time.perf_counter() - t0
        if log:
            log(f"  {preset} {device} batch {batch_size}: first step (with warm-up) {first * 1e3:.0f} ms")
        for i in range(warmup_steps + steps):
            frames = (frames + 0.01 * torch.randn_like(frames)).clamp(0, 1)
            sync()
            t0 = time.perf_counter()
            _, state = step(frames, depth, state, mode=mode, reconstruct_rgb=reconstruct_rgb)
            sync()
            if i >= warmup_steps:
                times.append(time.perf_counter() - t0)
                if log:
                    log(f"  {preset} {device} batch {batch_size}: step {i - warmup_steps + 1}/{steps} "
                        f"{times[-1] * 1e3:.0f} ms")
    latency = statistics.median(times)
    return {"preset": preset, "device": device, "batch": batch_size, "mode": mode, "rgb": reconstruct_rgb,
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
    device = cli_device(args.device)
    rows = []
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    for preset in args.presets:
        for batch in args.batch_sizes:
            rows.append(bench_model(preset, device, batch, steps=args.steps, warmup_steps=args.warmup_steps,
                                    mode=args.mode, compile=args.compile, seed=args.seed,
                                    reconstruct_rgb=not args.no_rgb, log=log))
    print(f"LociS.step latency (eval, inference_mode, mode={args.mode}, median of {args.steps} steps, "
          f"warm-up excluded{', no current-frame RGB reconstruction' if args.no_rgb else ''})")
    print(_format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _add_model_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("model", help="LociS.step latency per preset / device / batch size",
                              description="Median LociS.step latency (model.eval(), torch.inference_mode, "
                                          "first-frame warm-up excluded).")
    p.add_argument("--presets", nargs="+", default=["tiny"],
                   help="model presets, 'default' (the shipped checkpoint) or a model file (default: tiny)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16], help="batch sizes (default: 1 16)")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (default: 5)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps after the first frame")
    p.add_argument("--mode", default="seg", choices=["rnd", "reg", "seg"], help="slot assignment mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rgb", action="store_true",
                   help="skip the current frame's RGB reconstruction, as the RL wrappers do")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run_model)


# ---- wrapper ------------------------------------------------------------------------------------

WRAPPER_ENV = "locis/PushObjects-v0"


def _make_env(num_envs: int, vector: str, env_kwargs: dict[str, Any] | Sequence[dict[str, Any]]) -> Any:
    """A plain env (``vector="none"``) or a sync / async vector env of :data:`WRAPPER_ENV`.

    ``env_kwargs``: one dict for every env, or a sequence of ``num_envs`` dicts, one per sub-env.
    """
    import gymnasium as gym

    import envs  # noqa: F401  (registers locis/..., headless MuJoCo GL)

    per_env = [env_kwargs] * num_envs if isinstance(env_kwargs, dict) else list(env_kwargs)
    if len(per_env) != num_envs:
        raise ValueError(f"env_kwargs: expected {num_envs} dicts (one per env), actual count: {len(per_env)}")
    if num_envs == 1 and vector == "none":
        return gym.make(WRAPPER_ENV, **per_env[0])
    fns = [lambda kw=kw: gym.make(WRAPPER_ENV, **kw) for kw in per_env]
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
    from locis_rl.rl.perception import load_locis

    device = cli_device(args.device)
    try:
        model = load_locis(args.checkpoint, args.warmup)
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
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N")
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


# ---- memory -------------------------------------------------------------------------------------

MEMORY_MAX_SLOPE_MB = 1.0
"""Verdict threshold on the fitted slope after warm-up, MB per 10^4 steps (~100 bytes a step)."""
MEMORY_MAX_GROWTH_PCT = 2.0
"""Verdict threshold on ``last - first`` after warm-up, in % of ``first``."""
MEMORY_CSV_COLUMNS = ("vector_step", "env_step", "elapsed_s", "rss_mb", "cuda_allocated_mb", "episodes",
                      "partial_resets", "warmup")
"""Columns of ``memory.csv``, one row per sample (``cuda_allocated_mb`` empty on CPU)."""
_MB = float(2 ** 20)  # "MB" in this section: 2^20 bytes


def process_rss_mb() -> float:
    """Resident set size of this process in MB (2^20 bytes), read from ``/proc/self/statm``.

    Without ``/proc`` (not Linux) it is the *peak* RSS from :func:`resource.getrusage`: a leak still
    shows as growth there, a release of memory does not.
    """
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MB
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
        return peak / _MB if sys.platform == "darwin" else peak * 1024 / _MB


def least_squares_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Slope of the least-squares line through the points ``(x[i], y[i])``.

    Raises:
        ValueError: ``x`` and ``y`` differ in length, or there are fewer than 2 distinct ``x``.
    """
    import numpy as np

    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"expected x and y of one same length, actual shapes: {xs.shape}, {ys.shape}")
    dx = xs - xs.mean() if xs.size else xs
    denom = float(dx @ dx)
    if xs.size < 2 or denom == 0.0:
        raise ValueError(f"a slope needs at least 2 distinct x values, actual x: {xs.tolist()}")
    return float(dx @ (ys - ys.mean()) / denom)


def memory_verdict(steps: Sequence[float], values_mb: Sequence[float], *, warmup_steps: float,
                   max_slope_mb: float = MEMORY_MAX_SLOPE_MB,
                   max_growth_pct: float = MEMORY_MAX_GROWTH_PCT) -> dict[str, Any]:
    """Does a memory series grow? The rule of ``python -m locis_rl.bench memory``.

    Samples taken before ``warmup_steps`` are left out (allocator caches, the first episodes and
    resets fill up then). On the rest, ``slope`` is the least-squares slope in MB per 10^4 steps and
    ``growth_pct = 100 * (last - first) / first``. Verdict: ``"growth"`` if ``slope >=
    max_slope_mb`` or ``growth_pct >= max_growth_pct``, else ``"no growth"``.

    Why these thresholds: 1 MB per 10^4 steps is a leak of ~100 bytes a step (10 MB over 10^5
    steps), below any leaked tensor (one 64x64 RGB frame is 12 KB as uint8) yet ~4x the slope's
    standard error from RSS jitter of +-5 MB over 50 samples; 2 % of a process of ~0.5-1 GB is
    10-20 MB, more than that jitter.

    Args:
        steps: step of each sample (increasing).
        values_mb: memory at each sample, MB.
        warmup_steps: samples at ``step < warmup_steps`` are not fitted.

    Returns:
        dict(verdict, slope_mb_per_1e4_steps, intercept_mb (the fitted line at step 0), growth_pct,
        first_mb (first sample), first_after_warmup_mb, last_mb, max_mb (all samples),
        fitted_samples, fitted_steps (steps from the first fitted sample to the last)).

    Raises:
        ValueError: lengths differ, or fewer than 2 samples after warm-up.
    """
    import numpy as np

    xs, ys = np.asarray(steps, dtype=np.float64), np.asarray(values_mb, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"expected steps and values_mb of one same length, actual shapes: {xs.shape}, "
                         f"{ys.shape}")
    keep = xs >= warmup_steps
    if int(keep.sum()) < 2:
        raise ValueError(f"expected at least 2 samples at step >= warmup_steps ({warmup_steps}), actual "
                         f"count: {int(keep.sum())}; take more samples or a shorter warm-up")
    fx, fy = xs[keep], ys[keep]
    slope = least_squares_slope(fx, fy)
    first, last = float(fy[0]), float(fy[-1])
    if first > 0:
        growth_pct = 100.0 * (last - first) / first
    else:
        growth_pct = 0.0 if last <= first else math.inf
    slope_1e4 = slope * 1e4
    grows = slope_1e4 >= max_slope_mb or growth_pct >= max_growth_pct
    return {"verdict": "growth" if grows else "no growth", "slope_mb_per_1e4_steps": slope_1e4,
            "intercept_mb": float(fy.mean() - slope * fx.mean()), "growth_pct": growth_pct,
            "first_mb": float(ys[0]), "first_after_warmup_mb": first, "last_mb": last,
            "max_mb": float(ys.max()), "fitted_samples": int(keep.sum()), "fitted_steps": float(fx[-1] - fx[0])}


def bench_memory(model: Any, num_envs: int = 8, *, steps: int = 100_000, samples: int = 50,
                 warmup_fraction: float = 0.05, device: str = "cpu", seed: int = 0,
                 env_kwargs: dict[str, Any] | None = None, episode_stagger: int = 1,
                 progress: bool = False) -> dict[str, Any]:
    """Memory over a long run of :class:`LociSVectorWrapper` on a ``SyncVectorEnv`` of PushObjects.

    ``steps`` counts env steps summed over the sub-envs: the run makes ``ceil(steps / num_envs)``
    vector steps (one batched model step each) with random actions. Sub-env ``i`` truncates its
    episodes after ``max_steps + i * episode_stagger`` steps (``max_steps`` from ``env_kwargs``,
    default 100), so episodes end at different steps and the wrapper's partial resets (done rows
    re-initialised inside the batched step while the others go on) run throughout; ``SyncVectorEnv``
    auto-resets a done sub-env on its next step (``NEXT_STEP``).

    At ``samples`` evenly spaced vector steps, the first right after ``reset`` and the last at the
    end, after ``gc.collect()``: the process RSS (:func:`process_rss_mb`) and, on CUDA,
    ``torch.cuda.memory_allocated()``. Samples before ``warmup_fraction`` of the env steps are not
    fitted (:func:`memory_verdict`); the verdict is ``"growth"`` if RSS or CUDA memory grows.

    Returns:
        dict(env, num_envs, device, vector_steps, env_steps, warmup_env_steps, episode_lengths,
        episodes, partial_resets, seconds, env_steps_per_s, rows (one dict per sample, keys
        :data:`MEMORY_CSV_COLUMNS`), rss (:func:`memory_verdict`), cuda (the same, or None on CPU),
        verdict, thresholds).

    Raises:
        ValueError: bad counts, or fewer than 2 samples would fall after the warm-up.
    """
    import gc

    import numpy as np
    import torch
    from tqdm import tqdm

    from locis_rl.rl import LociSVectorWrapper

    if num_envs < 1 or steps < 1:
        raise ValueError(f"expected num_envs >= 1 and steps >= 1, actual values: {num_envs}, {steps}")
    if samples < 3:
        raise ValueError(f"expected samples >= 3, actual value: {samples}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"expected warmup_fraction in [0, 1), actual value: {warmup_fraction}")
    if episode_stagger < 0:
        raise ValueError(f"expected episode_stagger >= 0, actual value: {episode_stagger}")
    vector_steps = -(-steps // num_envs)
    env_steps = vector_steps * num_envs
    warmup_env_steps = warmup_fraction * env_steps
    points = np.unique(np.linspace(0, vector_steps, samples).round().astype(int))
    if int((points * num_envs >= warmup_env_steps).sum()) < 2:
        raise ValueError(f"only {int((points * num_envs >= warmup_env_steps).sum())} of {len(points)} "
                         f"samples fall after the warm-up ({warmup_env_steps:.0f} env steps); expected at "
                         "least 2: more steps or samples, or a smaller warm-up fraction")
    base_kwargs = dict(env_kwargs or {})
    max_steps = int(base_kwargs.pop("max_steps", 100))
    lengths = [max_steps + i * episode_stagger for i in range(num_envs)]
    cuda = str(device).startswith("cuda")

    env = LociSVectorWrapper(_make_env(num_envs, "sync", [{**base_kwargs, "max_steps": n} for n in lengths]),
                             model=model, device=device, seed=seed)
    rows: list[dict[str, Any]] = []
    episodes = partial_resets = 0
    bar = tqdm(total=env_steps, desc="memory", unit="step", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=2.0)

    def sample(vector_step: int, elapsed: float) -> None:
        gc.collect()
        rows.append({"vector_step": vector_step, "env_step": vector_step * num_envs, "elapsed_s": elapsed,
                     "rss_mb": process_rss_mb(),
                     "cuda_allocated_mb": torch.cuda.memory_allocated(device) / _MB if cuda else None,
                     "episodes": episodes, "partial_resets": partial_resets,
                     "warmup": vector_step * num_envs < warmup_env_steps})
        bar.set_postfix(rss_mb=f"{rows[-1]['rss_mb']:.0f}", refresh=False)

    try:
        env.action_space.seed(seed)
        env.reset(seed=seed)
        t0 = time.perf_counter()
        sample_at = iter(points.tolist())
        next_sample = next(sample_at)
        if next_sample == 0:
            sample(0, 0.0)
            next_sample = next(sample_at)
        for v in range(1, vector_steps + 1):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            done = int(np.logical_or(terminated, truncated).sum())
            episodes += done
            partial_resets += int(0 < done < num_envs)
            bar.update(num_envs)
            if v == next_sample:
                sample(v, time.perf_counter() - t0)
                next_sample = next(sample_at, None)
        seconds = time.perf_counter() - t0
    finally:
        bar.close()
        env.close()
    env_steps_arr = [r["env_step"] for r in rows]
    rss = memory_verdict(env_steps_arr, [r["rss_mb"] for r in rows], warmup_steps=warmup_env_steps)
    cuda_verdict = (memory_verdict(env_steps_arr, [r["cuda_allocated_mb"] for r in rows],
                                   warmup_steps=warmup_env_steps) if cuda else None)
    grows = rss["verdict"] == "growth" or (cuda_verdict is not None and cuda_verdict["verdict"] == "growth")
    return {"env": WRAPPER_ENV, "num_envs": num_envs, "device": str(device), "vector_steps": vector_steps,
            "env_steps": env_steps, "warmup_env_steps": warmup_env_steps, "episode_lengths": lengths,
            "episodes": episodes, "partial_resets": partial_resets, "seconds": seconds,
            "env_steps_per_s": env_steps / seconds, "rows": rows, "rss": rss, "cuda": cuda_verdict,
            "verdict": "growth" if grows else "no growth",
            "thresholds": {"max_slope_mb_per_1e4_steps": MEMORY_MAX_SLOPE_MB,
                           "max_growth_pct": MEMORY_MAX_GROWTH_PCT}}


def write_memory_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """``memory.csv``: one line per sample, columns :data:`MEMORY_CSV_COLUMNS`; written atomically."""
    import csv

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MEMORY_CSV_COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if r[k] is None else int(r[k]) if isinstance(r[k], bool) else r[k]
                                 for k in MEMORY_CSV_COLUMNS})

    return write_atomically(Path(path), write)


def plot_memory(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """``memory.png``: RSS (and CUDA memory) against env steps, warm-up shaded, fitted line; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [("rss", "rss_mb", "process RSS")]
    if result["cuda"] is not None:
        series.append(("cuda", "cuda_allocated_mb", "torch.cuda.memory_allocated"))
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 3.2 * len(series)), sharex=True, squeeze=False)
    x = np.array([r["env_step"] for r in result["rows"]], dtype=np.float64)
    for ax, (key, column, label) in zip(axes[:, 0], series):
        fit = result[key]
        ax.plot(x, [r[column] for r in result["rows"]], marker="o", markersize=3, label=label)
        ax.axvspan(0, result["warmup_env_steps"], color="grey", alpha=0.15, label="warm-up (not fitted)")
        fx = x[x >= result["warmup_env_steps"]]
        ax.plot(fx, fit["intercept_mb"] + fit["slope_mb_per_1e4_steps"] / 1e4 * fx, linestyle="--",
                label=f"fit: {fit['slope_mb_per_1e4_steps']:+.2f} MB / 10^4 steps")
        ax.set_ylabel("MB")
        ax.set_title(f"{label}: {fit['verdict']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(f"env steps (summed over {result['num_envs']} sub-envs)")
    fig.suptitle(f"{result['env']}, LociSVectorWrapper x {result['num_envs']}, {result['device']}: "
                 f"{result['verdict']}", fontsize=10)
    fig.tight_layout()
    try:
        return write_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def _format_memory_table(result: dict[str, Any]) -> str:
    cuda = result["cuda"] is not None
    header = (f"{'env step':>10} {'vector step':>11} {'elapsed s':>10} {'RSS MB':>9}"
              + (f" {'CUDA MB':>9}" if cuda else "") + f" {'episodes':>9} {'partial resets':>14}")
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(f"{r['env_step']:>10} {r['vector_step']:>11} {r['elapsed_s']:>10.1f} {r['rss_mb']:>9.1f}"
                     + (f" {r['cuda_allocated_mb']:>9.1f}" if cuda else "")
                     + f" {r['episodes']:>9} {r['partial_resets']:>14}" + ("  (warm-up)" if r["warmup"] else ""))
    return "\n".join(lines)


def _format_fit(name: str, fit: dict[str, Any]) -> str:
    return (f"{name}: slope {fit['slope_mb_per_1e4_steps']:+.3f} MB per 10^4 env steps (least squares over "
            f"{fit['fitted_samples']} samples after warm-up); first {fit['first_mb']:.1f}, first after "
            f"warm-up {fit['first_after_warmup_mb']:.1f}, last {fit['last_mb']:.1f}, max {fit['max_mb']:.1f} MB; "
            f"last - first after warm-up {fit['growth_pct']:+.2f} % -> {fit['verdict']}")


def _run_memory(args: argparse.Namespace) -> int:
    import torch

    from locis_rl.evaluate import write_json
    from locis_rl.rl.perception import load_locis

    device = cli_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model = load_locis(args.checkpoint, args.warmup)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        result = bench_memory(model, args.num_envs, steps=args.steps, samples=args.samples,
                              warmup_fraction=args.warmup_fraction, device=device, seed=args.seed,
                              env_kwargs={"num_distractors": args.num_distractors, "max_steps": args.max_steps},
                              episode_stagger=args.episode_stagger, progress=not args.quiet)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    result["checkpoint"] = args.checkpoint
    result["torch_threads"] = torch.get_num_threads()
    written = []
    if args.out:
        out = Path(args.out)
        written = [write_memory_csv(result["rows"], out / "memory.csv"), plot_memory(result, out / "memory.png"),
                   write_json(result, out / "memory.json")]
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    if args.json:
        written.append(write_json(result, args.json))
    n = result["num_envs"]
    print(f"Memory of {result['env']} under LociSVectorWrapper (SyncVectorEnv x {n}, checkpoint "
          f"{args.checkpoint}, {device}, {torch.get_num_threads()} torch thread(s), random actions): "
          f"{result['vector_steps']} vector steps = "
          f"{result['env_steps']} env steps (env steps summed over the {n} sub-envs); {result['episodes']} "
          f"episodes, {result['partial_resets']} partial resets; {result['seconds']:.0f} s "
          f"({result['env_steps_per_s']:.1f} env steps/s). Warm-up: the first {result['warmup_env_steps']:.0f} "
          "env steps, not fitted.")
    print(_format_memory_table(result))
    print(_format_fit("RSS", result["rss"]))
    if result["cuda"] is not None:
        print(_format_fit("CUDA allocated", result["cuda"]))
    fitted = result["rss"]["fitted_steps"]
    if fitted < 1e4:
        print(f"note: the fit spans only {fitted:.0f} env steps; a short run turns RSS jitter into a steep slope, "
              "so its verdict means little (run the default 10^5 steps)")
    print(f"rule: growth if slope >= {MEMORY_MAX_SLOPE_MB:g} MB per 10^4 env steps or last - first after warm-up "
          f">= {MEMORY_MAX_GROWTH_PCT:g} % (RSS{', CUDA' if result['cuda'] is not None else ''}; MB = 2^20 bytes)")
    print(f"verdict: {result['verdict']}")
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _add_memory_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "memory", help="memory growth over a long LociSVectorWrapper run (default 10^5 env steps)",
        description="Does a long run of LociSVectorWrapper leak memory? Steps a SyncVectorEnv of "
                    f"{WRAPPER_ENV} wrapped in LociSVectorWrapper with random actions (episodes end and "
                    "auto-reset on their own, at staggered steps, so partial resets happen), samples the "
                    "process RSS (and torch.cuda.memory_allocated on CUDA) at evenly spaced steps, fits a "
                    "least-squares line after the warm-up and prints a verdict: 'growth' if the slope is "
                    f">= {MEMORY_MAX_SLOPE_MB:g} MB per 10^4 env steps or the last sample is >= "
                    f"{MEMORY_MAX_GROWTH_PCT:g} % above the first after warm-up, else 'no growth'. "
                    "Steps are env steps summed over the sub-envs: --steps 100000 --num-envs 8 is 12500 "
                    "vector steps (batched model steps).")
    p.add_argument("--steps", type=int, default=100_000,
                   help="env steps summed over the sub-envs, rounded up to a multiple of --num-envs "
                        "(default: 100000 = 12500 vector steps with 8 envs)")
    p.add_argument("--num-envs", type=int, default=8, help="sub-envs of the SyncVectorEnv (default: 8)")
    p.add_argument("--checkpoint", default="tiny",
                   help="Loci-s weights: 'tiny' (random weights; memory does not depend on them, default), "
                        "'default' or a checkpoint path")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N")
    p.add_argument("--samples", type=int, default=50, help="evenly spaced memory samples (default: 50)")
    p.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="leading fraction of the steps left out of the fit (default: 0.05)")
    p.add_argument("--max-steps", type=int, default=100, help="episode length of sub-env 0 (default: 100)")
    p.add_argument("--episode-stagger", type=int, default=1,
                   help="sub-env i's episodes last max-steps + i * this, so they end apart (default: 1)")
    p.add_argument("--warmup", type=int, default=0,
                   help="slot warm-up iterations on a first frame (0: the checkpoint's own)")
    p.add_argument("--num-distractors", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; on a loaded 2-core machine 2 threads ran 3-15x slower; "
                        "0: torch's default)")
    p.add_argument("--out", default="runs/bench_memory",
                   help="folder for memory.csv, memory.png and memory.json (default: runs/bench_memory; "
                        "'' writes nothing)")
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="also write the result to this JSON file; without a file name, print JSON instead of "
                        "the table")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_run_memory)


SUBCOMMANDS = [_add_model_parser, _add_wrapper_parser, _add_memory_parser]
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
