"""Probe what the slots of a Loci-s model know about the objects (position, colour, size, shape).

    python examples/probe_slots.py                          # the shipped model ("default")
    python examples/probe_slots.py --checkpoint tiny --episodes 4 --frames 4   # random-weight smoke run

Every field of `Args` is a command-line flag. The method (matching slots to objects by mask IoU,
linear / MLP probes on held-out episodes, random-init control) is described in `locis_rl/probe.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch

from locis_rl.probe import format_table, run_probe, write_json


@dataclass
class Args:
    checkpoint: str = "default"
    """model file / run directory, "default", or a preset name (tiny, small, ...) for random weights"""
    env_id: str = "locis/MultiObject-v0"
    level: str = "a"
    """difficulty level a-e of locis/MultiObject-v0"""
    episodes: int = 16
    """episodes rolled out; a quarter of them (whole episodes) are held out for testing the probes"""
    frames: int = 8
    """frames per episode"""
    mode: str | None = None
    """slot assignment rnd / reg / seg (None: the model config's)"""
    seed: int = 0
    device: str = "cpu"
    min_iou: float = 0.2
    """slot-object pairs with a lower mask IoU are not used"""
    probes: tuple[str, ...] = ("linear", "mlp")
    feature_sets: tuple[str, ...] = ("all",)
    """"all" = gestalt + position + slot depth; or any of gestalt / position / depth"""
    control: bool = True
    """also probe a randomly initialised model of the same config"""
    threads: int = 1
    json_out: str | None = None
    extra_env_kwargs: dict = field(default_factory=dict)


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        if f.name == "extra_env_kwargs":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", default=list(default))
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default)
    return Args(**vars(parser.parse_args()))


if __name__ == "__main__":
    args = parse_args()
    torch.set_num_threads(args.threads)

    report = run_probe(
        args.checkpoint,
        args.env_id,
        {"level": args.level, **args.extra_env_kwargs},
        episodes=args.episodes,
        frames=args.frames,
        seed=args.seed,
        mode=args.mode,
        device=args.device,
        control=args.control,
        min_iou=args.min_iou,
        probes=args.probes,
        feature_sets=args.feature_sets,
    )

    for result in report["results"]:
        print(f"{result['model']}: {result['num_matched']} slot-object pairs from {result['num_frames']} "
              f"frames, match rate {result['match_rate']:.3f}")
    print()
    print(format_table(report))
    if args.json_out:
        print(f"\nwrote {write_json(report, args.json_out)}")
