"""Model comparisons on held-out data: ``python -m locis_rl.benchmark <subcommand>``.

(Speed benchmarks of one model live in :mod:`locis_rl.bench`.)

Subcommands:
    segmentation  the paper's table 1: Loci-s (rnd / reg / seg, optionally the depth variant)
                  against SAVi (unconditional, optionally conditioned on ground-truth boxes):
                  mIoU and FG-ARI per difficulty level, mean +- std over evaluation seeds.

Example::

    python -m locis_rl.benchmark segmentation --locis runs/gpu-budget-.../model.pt \\
        --savi runs/savi-gpu-budget-.../model.pt [--savi-conditional runs/savi-boxes-.../model.pt] \\
        [--locis-depth runs/...-depth/model.pt] --levels a c e --seeds 0 1 2 \\
        [--episodes 16 --frames 24] --out results/table1

Held-out data: for level ``L`` and seed index ``s`` the evaluation set is ``--episodes`` episodes x
``--frames`` frames of ``--env`` at level ``L`` recorded with base seed ``100000 + 1000 * s``
(episode ``i`` resets with seed ``base + i``), disjoint from every training recording of
:mod:`locis_rl.pretrain` (base seed ``data.seed``, 0 in every preset, and fewer than 100000
episodes). The files are generated once and cached in ``<cache>/heldout/`` (``--cache-dir``;
default ``$LOCIS_RL_CACHE/data`` or ``~/.cache/locis-rl/data``, as training data).

Each model runs over every set with :func:`locis_rl.evaluate.evaluate_model` (its seed = the seed
index). Outputs in ``--out``:

* ``table.md``: rows = models (Loci-s per slot-assignment mode, SAVi per conditioning), columns =
  mIoU and FG-ARI per level, in percent, ``mean ± std`` over seeds (population std, ``ddof=0``);
* ``results.json``: the same numbers as fractions with the per-seed values, every metric of every
  evaluation, the data files, and each checkpoint's training budget when its run directory has it
  (:func:`training_budget`: steps, per-stage step / time budgets, training seconds and the
  TensorBoard wall-clock);
* ``comparison.png``: one held-out clip (first episode of the first level and seed): the input
  frames, then per model the predicted masks overlaid on them (one row each).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from locis_rl.devices import cli_device

__all__ = ["main", "heldout_seed", "heldout_dataset", "training_budget", "benchmark_segmentation", "SUBCOMMANDS"]

HELDOUT_BASE_SEED = 100_000
HELDOUT_SEED_STRIDE = 1_000
TABLE_METRICS = ("mIoU", "FG-ARI")


def heldout_seed(seed_index: int) -> int:
    """Base seed of the held-out recording for evaluation seed index ``seed_index``."""
    return HELDOUT_BASE_SEED + HELDOUT_SEED_STRIDE * int(seed_index)


def _default_cache_dir() -> Path:
    from locis_rl.pretrain.config import TrainConfig
    from locis_rl.pretrain.data import cache_dir

    return cache_dir(TrainConfig())


def heldout_dataset(env_id: str, level: str, seed_index: int, episodes: int, frames: int, image_size: int, *,
                    cache_dir: str | os.PathLike | None = None, workers: int = 1,
                    log: Callable[[str], None] = print) -> Path:
    """Path of the (cached) held-out recording; generated on first use."""
    from locis_rl.pretrain.data import _cache_name

    if episodes > HELDOUT_SEED_STRIDE:
        raise ValueError(f"--episodes {episodes}: at most {HELDOUT_SEED_STRIDE} per set, so the sets of "
                         f"different seeds never share an episode seed")
    root = (Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()) / "heldout"
    seed = heldout_seed(seed_index)
    path = root / _cache_name(env_id, level, episodes, frames, image_size, seed)
    if not path.exists():
        from locis_rl.data.generate import generate

        log(f"generating held-out set: {episodes} episodes x {frames} frames of {env_id} level {level}, "
            f"seed {seed} -> {path}")
        generate(env_id, episodes, frames, path, env_kwargs={"level": level}, seed=seed, workers=workers,
                 image_size=image_size, progress=False)
    return path


# --------------------------------------------------------------------------------------------
# training budgets
# --------------------------------------------------------------------------------------------
_BUDGET_KEYS = ("steps", "uncertainty_steps", "extractor_steps", "max_minutes", "batch_size", "seq_len", "bptt")


def _tensorboard_seconds(tb_dir: Path) -> float | None:
    """Summed wall-clock span (first to last event) of the event files in ``tb_dir``: one file per
    invocation, so the time between an interruption and its ``--resume`` does not count."""
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    if not files:
        return None
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:  # pragma: no cover - tensorboard comes with the training extras
        return None
    total = 0.0
    for f in files:
        times = [ev.wall_time for ev in EventFileLoader(str(f)).Load()]
        if times:
            total += max(times) - min(times)
    return round(total, 1)


def training_budget(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """What the run that wrote ``checkpoint`` trained for, from its run directory, or ``None``.

    Keys (those available): ``run_dir``, ``preset``, ``model_family``, ``stage``, ``phases``,
    ``global_step`` (training steps / sequences over all phases), ``stages`` (each stage's step,
    batch and ``max_minutes`` budgets from ``config.json``), ``max_minutes_total`` (sum over the
    phases when every phase has a time budget), ``phase_seconds`` / ``train_seconds`` (training
    seconds per phase and in all, summed over the run's invocations: resumes and the pauses between
    them do not count), ``wall_clock_seconds`` (TensorBoard event span: training only, without data
    generation and final evaluation, but with any pause between a stop and its ``--resume``).
    """
    path = Path(checkpoint)
    run = path if path.is_dir() else path.parent
    info: dict[str, Any] = {}
    config = None
    if (run / "config.json").exists():
        config = json.loads((run / "config.json").read_text())
        info.update({k: config.get(k) for k in ("preset", "model_family", "stage")})
        info["model_family"] = info.get("model_family") or "locis"
    if (run / "checkpoint.pt").exists():
        try:
            ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
            info["global_step"] = int(ckpt.get("global_step", 0))
            info["phases"] = list(ckpt.get("phases", []))
            info["completed"] = int(ckpt.get("phase_index", 0)) >= len(info["phases"])
            if ckpt.get("phase_seconds"):
                info["phase_seconds"] = {k: round(float(v), 1) for k, v in ckpt["phase_seconds"].items()}
                info["train_seconds"] = round(sum(info["phase_seconds"].values()), 1)
        except Exception:  # noqa: BLE001 - a budget is optional metadata
            pass
    if "global_step" not in info and (run / "metrics.json").exists():
        metrics = json.loads((run / "metrics.json").read_text())
        if "global_step" in metrics:
            info["global_step"] = int(metrics["global_step"])
    if config is not None and isinstance(config.get("stages"), dict):
        family = info["model_family"]
        names = ["savi"] if family == "savi" else ["background", "objects", "proposal", "full"]
        stages = {n: {k: v for k, v in config["stages"].get(n, {}).items() if k in _BUDGET_KEYS}
                  for n in names if n in config["stages"]}
        if "phases" in info:  # only the stages this run trained
            trained = {p.split("/")[0] for p in info["phases"]}
            stages = {n: v for n, v in stages.items() if n in trained}
        info["stages"] = stages
        phases = info.get("phases") or []
        minutes = [stages.get(p.split("/")[0], {}).get("max_minutes", 0.0) for p in phases]
        info["max_minutes_total"] = round(sum(minutes), 3) if minutes and all(m > 0 for m in minutes) else None
    if (run / "tb").is_dir():
        info["wall_clock_seconds"] = _tensorboard_seconds(run / "tb")
    if not info:
        return None
    info["run_dir"] = str(run)
    return info


# --------------------------------------------------------------------------------------------
# segmentation (table 1)
# --------------------------------------------------------------------------------------------
def _load(checkpoint: str, device: str):
    from locis_rl.evaluate import load_model

    return load_model(checkpoint, map_location=device).eval()


def _model_rows(name: str, model: Any, modes: Sequence[str]) -> list[tuple[str, str]]:
    """``[(row label, evaluate_model mode key)]`` of a model."""
    from locis_rl.evaluate import _is_savi, savi_label

    if _is_savi(model):
        cond = model.config.conditioning
        suffix = {"boxes": " (GT boxes)", "centers": " (GT centres)", "unconditional-sampled": " (sampled)"}
        return [(name + suffix.get(cond, ""), savi_label(model.config))]
    return [(f"{name} ({m})", m) for m in modes]


@torch.no_grad()
def _rollout_masks(model: Any, item: dict[str, torch.Tensor], mode: str | None, seed: int,
                   device: torch.device) -> torch.Tensor:
    """Visible masks ``[T, K+1, H, W]`` of one clip (background channel last)."""
    from locis_rl.evaluate import _is_savi, model_step

    rgb = item["rgb"].to(device)[None]
    depth = item.get("depth")
    depth = depth.to(device)[None] if depth is not None else None
    seg = item.get("segmentation")
    state = model.init_state(1, device, seed=seed)
    masks = []
    for t in range(rgb.shape[1]):
        out, state = model_step(model, rgb[:, t], None if depth is None else depth[:, t], state,
                                mode=None if _is_savi(model) else mode,
                                first_segmentation=None if seg is None else seg[None, 0], t=t)
        masks.append(out["masks"][0].float().cpu())
    return torch.stack(masks)


def _comparison_png(item: dict[str, torch.Tensor], rows: list[tuple[str, torch.Tensor]], path: Path,
                    num_frames: int, scale: int = 2) -> Path:
    """Grid: row 0 the input frames, then one row of overlaid masks per ``(label, masks [T,K+1,H,W])``."""
    from PIL import Image, ImageDraw

    from locis_rl.pretrain.visualize import overlay_masks, save_png

    rgb = item["rgb"]
    T, _, H, W = rgb.shape
    idx = np.unique(np.linspace(0, T - 1, min(num_frames, T)).round().astype(int)).tolist()
    label_w, sep = 96, 2
    lines = [("input", [rgb[t].numpy().transpose(1, 2, 0) for t in idx])]
    lines += [(label, [overlay_masks(rgb[t], m[t]) for t in idx]) for label, m in rows]
    h, w = H * scale, W * scale
    canvas = np.ones((len(lines) * (h + sep) - sep, label_w + len(idx) * (w + sep) - sep, 3), np.uint8) * 255
    for r, (_, cells) in enumerate(lines):
        for c, cell in enumerate(cells):
            img = (np.clip(cell, 0, 1) * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
            y, x = r * (h + sep), label_w + c * (w + sep)
            canvas[y:y + h, x:x + w] = img
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for r, (label, _) in enumerate(lines):
        y = r * (h + sep) + h // 2 - 12
        for i, part in enumerate(_wrap(label, 14)):
            draw.text((4, y + 12 * i), part, fill=(0, 0, 0))
    return save_png(np.asarray(image), path)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + ([cur] if cur else [])


def _fmt(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _table_md(rows: dict[str, Any], levels: Sequence[str], seeds: Sequence[int], episodes: int, frames: int) -> str:
    header = ["model"] + [f"{lv}: {m}" for lv in levels for m in TABLE_METRICS]
    out = [f"Segmentation on held-out locis/MultiObject-v0 episodes ({episodes} episodes x {frames} frames "
           f"per level and seed; seeds {list(seeds)}): {', '.join(TABLE_METRICS)} in %, mean ± std over seeds.",
           "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    for label, per_level in rows.items():
        cells = [label] + [_fmt(per_level[lv][m]["mean"], per_level[lv][m]["std"])
                           for lv in levels for m in TABLE_METRICS]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    return {"mean": float(ok.mean()) if ok.size else math.nan, "std": float(ok.std()) if ok.size else math.nan,
            "per_seed": [None if math.isnan(v) else float(v) for v in arr]}


def benchmark_segmentation(models: Sequence[tuple[str, str, str]], levels: Sequence[str], seeds: Sequence[int], *,
                           out: str | os.PathLike, episodes: int = 16, frames: int = 24,
                           env_id: str = "locis/MultiObject-v0", modes: Sequence[str] = ("rnd", "reg", "seg"),
                           cache_dir: str | os.PathLike | None = None, workers: int = 1, batch_size: int = 4,
                           device: str = "cpu", comparison_mode: str = "seg", comparison_frames: int = 6,
                           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``models`` on held-out sets and write ``table.md``, ``results.json``, ``comparison.png``.

    Args:
        models: ``(key, name, checkpoint)``; ``key`` is ``locis``, ``locis-depth``, ``savi`` or
            ``savi-conditional`` (checked against the checkpoint), ``name`` the row label's stem
            (Loci-s rows: ``name (mode)``; SAVi rows: ``name`` plus `` (GT boxes)`` when conditional).

    Returns the ``results.json`` content.
    """
    from locis_rl.data import VideoDataset
    from locis_rl.evaluate import _is_savi, evaluate_model, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    loaded = []
    for key, name, ckpt in models:
        model = _load(ckpt, device)
        savi = _is_savi(model)
        role = "locis" if key.startswith("locis") else key
        if role == "locis" and savi:
            raise ValueError(f"{name}: {ckpt} is a SAVi checkpoint (pass it with --savi / --savi-conditional)")
        if role.startswith("savi") and not savi:
            raise ValueError(f"{name}: {ckpt} is not a SAVi checkpoint")
        if role == "savi-conditional" and not model.config.conditional:
            raise ValueError(f"{name}: {ckpt} is an unconditional SAVi (conditioning="
                             f"{model.config.conditioning!r}); --savi-conditional needs boxes or centers")
        loaded.append((key, name, ckpt, model))
    sizes = {m.config.image_size for *_, m in loaded}
    data: dict[str, dict[str, dict[str, str]]] = {}
    for size in sorted(sizes):
        data[str(size)] = {lv: {str(s): str(heldout_dataset(env_id, lv, s, episodes, frames, size,
                                                               cache_dir=cache_dir, workers=workers, log=log))
                                for s in seeds} for lv in levels}
    rows: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for key, name, ckpt, model in loaded:
        row_keys = _model_rows(name, model, modes)
        info[key] = {"checkpoint": str(ckpt), "model": type(model).__name__,
                     "rows": [label for label, _ in row_keys], "training": training_budget(ckpt)}
        if _is_savi(model):
            info[key]["conditioning"] = model.config.conditioning
        else:
            info[key]["use_depth"] = bool(model.config.use_depth)
        per: dict[str, dict[str, dict[str, list[float]]]] = {
            label: {lv: {m: [] for m in TABLE_METRICS} for lv in levels} for label, _ in row_keys}
        t0 = time.perf_counter()
        for lv in levels:
            for s in seeds:
                path = data[str(model.config.image_size)][lv][str(s)]
                res = evaluate_model(model, path, modes, batch_size=batch_size, seed=int(s), device=dev)
                for label, mode in row_keys:
                    for m in TABLE_METRICS:
                        per[label][lv][m].append(res["modes"][mode][m])
                    raw.setdefault(label, {}).setdefault(lv, {})[str(s)] = res["modes"][mode]
                log(f"level {lv} seed {s}: " + ", ".join(
                    f"{label} mIoU {res['modes'][mode]['mIoU']:.3f} FG-ARI {res['modes'][mode]['FG-ARI']:.3f}"
                    for label, mode in row_keys))
        info[key]["eval_seconds"] = round(time.perf_counter() - t0, 1)
        for label, _ in row_keys:
            rows[label] = {lv: {m: _stats(per[label][lv][m]) for m in TABLE_METRICS} for lv in levels}

    results = {"benchmark": "segmentation", "env_id": env_id, "levels": list(levels), "seeds": list(seeds),
               "heldout_seeds": {str(s): heldout_seed(s) for s in seeds}, "episodes": episodes, "frames": frames,
               "metrics": list(TABLE_METRICS), "std": "population (ddof=0) over seeds", "data": data,
               "models": info, "rows": rows, "evaluations": raw}
    write_json(results, out / "results.json")
    (out / "table.md").write_text(_table_md(rows, levels, seeds, episodes, frames))

    # one clip, every model's masks
    first = loaded[0][3].config.image_size
    clip_path = data[str(first)][levels[0]][str(seeds[0])]
    item = VideoDataset(clip_path, seq_len=frames)[0]
    masks_rows = []
    mode = comparison_mode if comparison_mode in modes else modes[0]
    for _, name, _, model in loaded:
        if model.config.image_size != first:
            continue
        label = _model_rows(name, model, [mode])[0][0]
        masks_rows.append((label, _rollout_masks(model, item, mode, int(seeds[0]), dev)))
    _comparison_png(item, masks_rows, out / "comparison.png", comparison_frames)
    results["comparison"] = {"data": clip_path, "episode": 0, "level": levels[0], "seed": seeds[0]}
    write_json(results, out / "results.json")
    log(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'comparison.png'}")
    return results


def _add_segmentation_parser(sub) -> None:
    p = sub.add_parser("segmentation", help="table 1: mIoU / FG-ARI of Loci-s and SAVi per level",
                       description="Loci-s vs. SAVi segmentation on held-out data (the paper's table 1).")
    p.add_argument("--locis", required=True, metavar="CKPT", help="Loci-s model.pt / run directory")
    p.add_argument("--locis-depth", metavar="CKPT", help="Loci-s with depth input (row Loci-s_d)")
    p.add_argument("--savi", required=True, metavar="CKPT", help="unconditional SAVi model.pt / run directory")
    p.add_argument("--savi-conditional", metavar="CKPT",
                   help="SAVi trained with conditioning=boxes|centers (ground-truth first-frame boxes)")
    p.add_argument("--levels", nargs="+", default=["a", "c", "e"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="evaluation seed indices; set s is recorded with base seed 100000 + 1000 s")
    p.add_argument("--episodes", type=int, default=16, help="episodes per level and seed")
    p.add_argument("--frames", type=int, default=24, help="frames per episode")
    p.add_argument("--modes", nargs="+", default=["rnd", "reg", "seg"], choices=["rnd", "reg", "seg"],
                   help="Loci-s slot-assignment modes (one table row each)")
    p.add_argument("--env", default="locis/MultiObject-v0")
    p.add_argument("--out", required=True, help="output directory (table.md, results.json, comparison.png)")
    p.add_argument("--cache-dir", default=None, help="held-out data cache (default: the training data cache)")
    p.add_argument("--workers", type=int, default=1, help="processes recording held-out data")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--comparison-mode", default="seg", choices=["rnd", "reg", "seg"],
                   help="Loci-s mode shown in comparison.png")
    p.add_argument("--comparison-frames", type=int, default=6)
    p.set_defaults(func=_run_segmentation)


def _run_segmentation(args: argparse.Namespace) -> int:
    args.device = cli_device(args.device)
    models = [("locis", "Loci-s", args.locis)]
    if args.locis_depth:
        models.append(("locis-depth", "Loci-s_d", args.locis_depth))
    models.append(("savi", "SAVi", args.savi))
    if args.savi_conditional:
        models.append(("savi-conditional", "SAVi", args.savi_conditional))
    benchmark_segmentation(models, args.levels, args.seeds, out=args.out, episodes=args.episodes,
                           frames=args.frames, env_id=args.env, modes=args.modes, cache_dir=args.cache_dir,
                           workers=args.workers, batch_size=args.batch_size, device=args.device,
                           comparison_mode=args.comparison_mode, comparison_frames=args.comparison_frames,
                           log=lambda m: print(f"[benchmark] {m}", file=sys.stderr, flush=True))
    print((Path(args.out) / "table.md").read_text())
    return 0


SUBCOMMANDS = {"segmentation": _add_segmentation_parser}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locis_rl.benchmark", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
