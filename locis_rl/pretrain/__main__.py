"""Command line of ``python -m locis_rl.pretrain`` (see :mod:`locis_rl.pretrain`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m locis_rl.pretrain",
        description="Train Loci-s on offline videos (background -> objects -> proposal -> full), "
                    "or the SAVi baseline (--model savi: one stage, savi).",
        epilog="Overrides: key=value with dotted keys, e.g. model.num_slots=8 stages.full.steps=200 "
               "optim.lr=3e-4 data.levels=[a,b]. Presets live in configs/train/.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--preset", default="quickstart", help="training preset name or YAML path (default: quickstart)")
    p.add_argument("--stage", default="all", choices=["background", "objects", "proposal", "full", "savi", "all"],
                   help="Loci-s stage(s) to run; `savi` (implies --model savi) for the SAVi baseline")
    p.add_argument("--model", choices=["locis", "savi"], default=None,
                   help="model family (= model_family=...; default: the preset's, locis). With savi, "
                        "model_preset names a SAVi preset (tiny = configs/model/savi-tiny.yaml)")
    p.add_argument("--data", nargs="+", metavar="FILE.h5",
                   help="video files from `python -m locis_rl.data.generate` (default: generate the preset's)")
    p.add_argument("--run-dir", help="output directory (default: runs/<preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint.pt")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from these weights (model.pt, a run directory or checkpoint.pt; e.g. for --stage full)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "OUT.pt"),
                   help="write the model of a training checkpoint.pt (or run directory) as a model file "
                        "for LociS.from_pretrained / --checkpoint, and exit: the weights of a run that "
                        "was stopped before its end")
    return p


def export_model(checkpoint: str, out: str) -> str:
    """The model of a training checkpoint (or run directory) saved as a model file; returns its path."""
    from locis_rl.evaluate import load_model

    return str(load_model(checkpoint).save_pretrained(out))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data:  # `--data a.h5 key=value`: nargs="+" swallows the overrides that follow
        args.overrides = [*args.overrides, *[d for d in args.data if "=" in d]]
        args.data = [d for d in args.data if "=" not in d] or None
    from locis_rl.model.checkpoint_io import CheckpointError
    from locis_rl.model.config import ConfigError
    from locis_rl.pretrain.checkpointing import ResumeError
    from locis_rl.pretrain.config import load_train_config, parse_overrides
    from locis_rl.pretrain.data import DataError

    try:
        if args.export:
            print(f"wrote {export_model(*args.export)}")
            return 0
        overrides = parse_overrides(args.overrides)
        family = args.model or ("savi" if args.stage == "savi" else None)
        if family is not None and not args.resume:
            overrides["model_family"] = family
        if args.data:
            overrides["data.paths"] = list(args.data)
        if args.resume:
            if args.run_dir:
                raise ResumeError("--resume continues in the run directory it names; drop --run-dir")
            cfg = None
        else:
            cfg = load_train_config(args.preset, overrides)
            if args.print_config:
                import yaml

                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                return 0
        from locis_rl.pretrain.run import train

        result = train(cfg, stage=args.stage, run_dir=args.run_dir, resume=args.resume, init=args.init,
                       overrides=overrides if args.resume else None)
    except (ConfigError, ResumeError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        state = "finished" if result.completed else "stopped (resume with --resume)"
        print(f"{state}: {result.run_dir} (global step {result.global_step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
