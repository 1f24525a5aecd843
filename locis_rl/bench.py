"""Benchmarks: ``python -m locis_rl.bench <subcommand>``.

Subcommands:
    model   step latency of :class:`locis_rl.model.LociS` per preset / device / batch size.

Example:
    python -m locis_rl.bench model --presets tiny --batch-sizes 1 16 --steps 5

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

__all__ = ["main", "bench_model", "SUBCOMMANDS"]


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


SUBCOMMANDS = [_add_model_parser]
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
