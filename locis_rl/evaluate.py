"""Evaluate a Loci-s (or SAVi) checkpoint on recorded videos: segmentation and reconstruction metrics.

Usage::

    python -m locis_rl.evaluate --checkpoint runs/quickstart-.../model.pt --data data/val.h5 \\
        --mode rnd --mode reg --mode seg [--json metrics.json] [--out vis/] [--max-sequences 16] \\
        [--num-slots 10] [--override assignment.warmup_inference=5]
    python -m locis_rl.evaluate --checkpoint runs/savi-quickstart-.../model.pt --data data/val.h5

SAVi checkpoints (``SAVi.save_pretrained``, or a run of ``python -m locis_rl.pretrain --model
savi``) have no slot-assignment modes: they are evaluated once, in the row ``savi`` (unconditional,
``savi-sampled`` for sampled initial slots) or ``savi-boxes`` / ``savi-centers`` (conditioned on the
ground-truth boxes / centres of each sequence's first frame, :func:`locis_rl.savi.boxes_from_segmentation`).
``--conditioning`` defaults to the model's own (its initializer's weights fix it). SAVi has no
background slot: every pixel belongs to some slot.

``--checkpoint`` takes a file from ``LociS.save_pretrained``, ``default`` (the shipped model), a
training run directory (its ``model.pt``, else its ``checkpoint.pt``) or a training
``checkpoint.pt``. ``--mode`` may be repeated (or given several values); default: all three.

``--num-slots K`` runs a Loci-s checkpoint with ``K`` slots instead of the number it was trained
with (e.g. more slots for scenes with more objects); ``--override KEY=VALUE`` (repeatable) changes
other inference-time fields such as ``assignment.warmup_inference``. Only fields that size no
parameter are allowed (:data:`locis_rl.model.config.INFERENCE_OVERRIDE_KEYS`); the weights load
unchanged. The JSON then records them under ``"overrides"``.

What is measured (per slot-assignment mode, ``rnd`` / ``reg`` / ``seg``, section 3.6)
------------------------------------------------------------------------------------
The model runs over every sequence in eval mode: ``init_state`` (seeded), then ``step`` per frame
(the first frame includes the ``warmup_inference`` warm-up passes). The visible masks of a step
(``[K+1,H,W]``, background slot last) become a label map by argmax, with the background slot -> 0
and slot ``k`` -> ``k + 1`` (:func:`labels_from_masks`). Metrics (:mod:`locis_rl.metrics`) are
computed per sequence on the ``(T,H,W)`` label video and averaged over sequences (``nanmean``):

* ``FG-ARI`` (= ARI-O): ARI over ground-truth foreground pixels; one cluster per object over the
  whole sequence, so identity switches count.
* ``mIoU``: per-frame Hungarian matching (as the paper's table 1), background excluded;
  ``mIoU-seq``: one matching per sequence.
* ``ARI-A`` / ``AMI-A`` (all pixels), ``AMI-O`` (foreground), ``F1`` (IoU >= 0.5 detections,
  per sequence), ``OCA`` (object count per sequence exactly right).
* ``RGB-SSIM`` / ``RGB-MSE``: reconstruction of the current frame; ``Depth-SSIM`` / ``Depth-MSE``:
  predicted vs. ground-truth depth, both in scene-relative units (appendix B), when the file stores
  depth.

Files without segmentation give the reconstruction metrics only. Visualisations (``--out``): per
mode and sequence a PNG (frames 0, T/2, T-1) and a GIF (all frames) of the slot decomposition:
input | masks overlaid | reconstruction | background | slots (rows: RGB, depth, masks).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from locis_rl.atomic_files import write_atomically
from locis_rl.devices import cli_device

__all__ = ["evaluate_model", "labels_from_masks", "load_model", "format_table", "main", "METRIC_KEYS",
           "model_step", "savi_label"]

SEGMENTATION_KEYS = ("FG-ARI", "mIoU", "mIoU-seq", "ARI-A", "AMI-A", "AMI-O", "F1", "OCA")
RECONSTRUCTION_KEYS = ("RGB-SSIM", "RGB-MSE", "Depth-SSIM", "Depth-MSE")
METRIC_KEYS = SEGMENTATION_KEYS + RECONSTRUCTION_KEYS


def labels_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Label map from visible masks ``[..., K+1, H, W]`` (background slot last).

    Returns ``int64 [..., H, W]``: 0 where the background slot wins the argmax, ``k + 1`` where
    slot ``k`` does.
    """
    k = masks.shape[-3] - 1
    idx = masks.argmax(dim=-3)
    return torch.where(idx == k, torch.zeros_like(idx), idx + 1)


def load_model(checkpoint: str | os.PathLike, map_location: Any = "cpu",
               overrides: Mapping[str, Any] | None = None):
    """A :class:`LociS` from a model file, a packaged name (``default``, ``depth``), a run directory
    or a training checkpoint; a :class:`~locis_rl.savi.SAVi` when the file / run holds one.

    Args:
        overrides: Loci-s only: inference-time config changes, e.g. ``{"num_slots": 10}`` (keys:
            :data:`~locis_rl.model.config.INFERENCE_OVERRIDE_KEYS`; see
            :meth:`LociS.from_pretrained`). The weights load unchanged.

    Raises:
        FileNotFoundError: nothing to load there.
        ValueError: ``overrides`` with a SAVi checkpoint; ``ConfigError`` (a ``ValueError``) for a
            disallowed key or value; ``CheckpointError`` for a broken file.
    """
    from locis_rl.model import LociS
    from locis_rl.model.config import apply_inference_overrides, inference_overrides
    from locis_rl.model.locis import pretrained_checkpoint

    flat = inference_overrides(overrides)
    path = None if pretrained_checkpoint(checkpoint) is not None else Path(checkpoint)
    if path is not None and path.is_dir():
        if (path / "model.pt").exists():
            path = path / "model.pt"
        elif (path / "checkpoint.pt").exists():
            path = path / "checkpoint.pt"
        else:
            raise FileNotFoundError(f"{checkpoint}: directory has neither model.pt nor checkpoint.pt")
    if path is not None and path.exists():
        from locis_rl.pretrain.checkpointing import TRAIN_FORMAT, load_train_checkpoint

        try:
            head = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - let from_pretrained produce its own error message
            head = None
        savi_file = isinstance(head, dict) and head.get("model") == "SAVi"
        train_file = isinstance(head, dict) and head.get("format") == TRAIN_FORMAT
        if train_file:
            ckpt = load_train_checkpoint(path)
            savi_file = ckpt["config"].get("model_family", "locis") == "savi"
        if savi_file and flat:
            raise ValueError(f"{path}: holds a SAVi model; config overrides ({sorted(flat)}) apply to "
                             f"Loci-s checkpoints only")
        if savi_file and not train_file:
            from locis_rl.savi import SAVi

            return SAVi.from_pretrained(path, map_location=map_location)
        if train_file:
            from locis_rl.model import LociSConfig

            if savi_file:
                from locis_rl.savi import SAVi, SAViConfig

                model = SAVi(SAViConfig.from_dict(ckpt["config"]["model"]))
                model.load_state_dict(ckpt["model"])
                return model.to(map_location)
            config = apply_inference_overrides(LociSConfig.from_dict(ckpt["config"]["model"]), flat)
            model = LociS(config)
            model.load_state_dict(ckpt["model"])
            return model.to(map_location)
    return LociS.from_pretrained(str(checkpoint) if path is None else path, map_location=map_location,
                                 overrides=flat)


def _as_dataset(dataset_or_path: Any, image_size: int):
    if isinstance(dataset_or_path, (str, os.PathLike)) or (
            isinstance(dataset_or_path, (list, tuple)) and dataset_or_path
            and isinstance(dataset_or_path[0], (str, os.PathLike))):
        from locis_rl.data import VideoDataset, describe

        paths = [dataset_or_path] if isinstance(dataset_or_path, (str, os.PathLike)) else list(dataset_or_path)
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"data file {p!r} does not exist; create one with "
                                        f"`python -m locis_rl.data.generate --env locis/MultiObject-v0 --out {p}`")
        frames = min(int(describe(p)["frames"]) for p in paths)
        return VideoDataset(paths, seq_len=frames, image_size=image_size)
    return dataset_or_path


def _batches(dataset: Any, batch_size: int, limit: int | None) -> Iterable[dict[str, torch.Tensor]]:
    n = len(dataset)
    if limit is not None:
        n = min(n, int(limit))
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]
               if torch.is_tensor(items[0][k]) and all(k in it for it in items)}


def savi_label(config: Any) -> str:
    """Row label of a SAVi model: ``savi`` / ``savi-sampled`` / ``savi-boxes`` / ``savi-centers``."""
    return {"unconditional-learned": "savi", "unconditional-sampled": "savi-sampled"}.get(
        config.conditioning, f"savi-{config.conditioning}")


def _is_savi(model: Any) -> bool:
    return isinstance(getattr(getattr(model, "config", None), "conditioning", None), str)


def model_step(model: Any, rgb: torch.Tensor, depth: torch.Tensor | None, state: Any, *, mode: str | None,
               first_segmentation: torch.Tensor | None = None, t: int = 0):
    """``model.step`` on frame ``t`` of a sequence, for Loci-s (slot-assignment ``mode``) and SAVi
    (conditional SAVi: ground-truth boxes / centres of ``first_segmentation [B,H,W]`` at ``t == 0``)."""
    use_depth = model.config.use_depth
    if not _is_savi(model):
        return model.step(rgb, depth if use_depth else None, state, mode=mode)
    kwargs: dict[str, Any] = {}
    if t == 0 and model.config.conditional:
        from locis_rl.savi.train import gt_conditioning

        seg = None if first_segmentation is None else first_segmentation.to(rgb.device)
        kwargs["conditioning"] = gt_conditioning(model, seg)
    return model.step(rgb, depth if use_depth else None, state, **kwargs)


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(arr)
    return float(arr[ok].mean()) if ok.any() else math.nan


@torch.no_grad()
def evaluate_model(model, dataset_or_path: Any, modes: Sequence[str] = ("rnd", "reg", "seg"), *,
                   max_sequences: int | None = None, batch_size: int = 4, seed: int = 0,
                   out_dir: str | os.PathLike | None = None, visualize: int = 1,
                   device: str | torch.device | None = None, progress: bool = False,
                   conditioning: str | None = None, per_frame: bool = False) -> dict[str, Any]:
    """Run ``model`` over each sequence for every mode and compute the metrics.

    Args:
        model: a :class:`~locis_rl.model.LociS` (put in eval mode here; its mode is restored), or a
            :class:`~locis_rl.savi.SAVi`: ``modes`` is then ignored and the model evaluated once,
            under the label :func:`savi_label` (conditional SAVi: ground-truth first-frame boxes /
            centres, so the data needs segmentation).
        dataset_or_path: an HDF5 path / list of paths (whole episodes are used) or a dataset of
            dicts with ``rgb [T,3,H,W]`` (+ ``depth``, ``segmentation``) as :class:`VideoDataset`
            yields.
        modes: slot-assignment modes to evaluate.
        max_sequences: evaluate at most this many sequences (None = all).
        out_dir: where PNG / GIF visualisations go (None = none); ``visualize`` sequences per mode.
        conditioning: SAVi only: ``None`` or the model's ``config.conditioning`` (anything else is
            a ``ValueError``: the initializer's weights fix it).
        per_frame: also score every frame index on its own (data with segmentation): each mode's
            entry gets ``"per_frame": {"FG-ARI": [T values], "mIoU": [T values]}``, the mean over
            sequences of the single-frame scores, which shows where in a video the model fails
            (say, while objects still move fast after the first frame).

    Returns:
        ``{"modes": {mode: {metric: value, ..., "sequences": n, "seconds": s}}, "metrics":
        [...], "num_sequences": n}`` with the metric keys of :data:`METRIC_KEYS` present (NaN for
        metrics undefined on this data, e.g. segmentation metrics without masks).
    """
    from locis_rl import metrics as M
    from locis_rl.model.depth_input import scene_relative_depth

    savi = _is_savi(model)
    if savi:
        if conditioning is not None and conditioning != model.config.conditioning:
            raise ValueError(f"conditioning: this SAVi was trained with conditioning="
                             f"{model.config.conditioning!r}; its initializer cannot run {conditioning!r}")
        modes = [savi_label(model.config)]
    elif conditioning is not None:
        raise ValueError("conditioning applies to SAVi checkpoints only (Loci-s: use modes)")
    for mode in modes:
        if not savi and mode not in ("rnd", "reg", "seg"):
            raise ValueError(f"unknown mode {mode!r}; expected rnd, reg or seg")
    dataset = _as_dataset(dataset_or_path, model.config.image_size)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {"modes": {}, "metrics": list(METRIC_KEYS)}
    n_total = 0
    try:
        for mode in modes:
            per: dict[str, list[float]] = {k: [] for k in METRIC_KEYS}
            frame_scores: dict[str, list[torch.Tensor]] = {"FG-ARI": [], "mIoU": []}  # [B, T] per batch
            t_start = time.perf_counter()
            n_seq = 0
            vis_left = visualize if out_dir is not None else 0
            for bi, batch in enumerate(_batches(dataset, batch_size, max_sequences)):
                rgb = batch["rgb"].to(device)
                b, T = rgb.shape[:2]
                depth = batch.get("depth")
                depth = depth.to(device) if depth is not None else None
                seg = batch.get("segmentation")
                if savi and model.config.conditional and seg is None:
                    raise ValueError(f"SAVi with conditioning={model.config.conditioning!r} needs the "
                                     f"ground-truth segmentation of each sequence's first frame; the data "
                                     f"has none")
                state = model.init_state(b, device, seed=seed + 7919 * bi)
                masks, recon, recon_d, frames_vis = [], [], [], [[] for _ in range(min(vis_left, b))]
                for t in range(T):
                    d_t = depth[:, t] if depth is not None else None
                    out, state = model_step(model, rgb[:, t], d_t, state, mode=None if savi else mode,
                                            first_segmentation=None if seg is None else seg[:, 0], t=t)
                    masks.append(labels_from_masks(out["masks"].float()).cpu())
                    recon.append(out["rgb"].float().clamp(0, 1))
                    if "depth" in out.keys():  # SAVi without predict_depth predicts no depth
                        recon_d.append(out["depth"].float())
                    if frames_vis:
                        from locis_rl.pretrain.visualize import frame_from_output

                        disp = scene_relative_depth(d_t) if d_t is not None else None
                        for r in range(len(frames_vis)):
                            frames_vis[r].append(frame_from_output(out, r, rgb[:, t], disp))
                labels = torch.stack(masks, dim=1)  # [B,T,H,W]
                pred_rgb = torch.stack(recon, dim=1)
                per["RGB-MSE"] += (pred_rgb - rgb).pow(2).flatten(1).mean(1).tolist()
                per["RGB-SSIM"] += M.ssim(pred_rgb, rgb).tolist()
                if depth is not None and recon_d:
                    true_d = scene_relative_depth(depth.flatten(0, 1)).view_as(depth)
                    pred_d = torch.stack(recon_d, dim=1)
                    per["Depth-MSE"] += (pred_d - true_d).pow(2).flatten(1).mean(1).tolist()
                    per["Depth-SSIM"] += M.ssim(pred_d, true_d).tolist()
                else:
                    per["Depth-MSE"] += [math.nan] * b
                    per["Depth-SSIM"] += [math.nan] * b
                if seg is not None:
                    true = seg.long()
                    per["FG-ARI"] += M.fg_ari(labels, true).tolist()
                    per["ARI-A"] += M.ari(labels, true).tolist()
                    per["AMI-A"] += M.ami(labels, true).tolist()
                    per["AMI-O"] += M.ami(labels, true, foreground_only=True).tolist()
                    per["mIoU"] += M.miou(labels, true, per_frame=True).tolist()
                    per["mIoU-seq"] += M.miou(labels, true).tolist()
                    per["F1"] += M.f1(labels, true).tolist()
                    per["OCA"] += M.oca(labels, true).tolist()
                    if per_frame:  # every frame as a one-frame video: one batched call per metric
                        frames = (b * T, 1) + tuple(labels.shape[2:])
                        one_pred, one_true = labels.reshape(frames), true.reshape(frames)
                        frame_scores["FG-ARI"].append(M.fg_ari(one_pred, one_true).view(b, T))
                        frame_scores["mIoU"].append(M.miou(one_pred, one_true).double().view(b, T))
                else:
                    for k in SEGMENTATION_KEYS:
                        per[k] += [math.nan] * b
                for r, frames in enumerate(frames_vis):
                    from locis_rl.pretrain.visualize import save_gif, save_png

                    idx = sorted({0, len(frames) // 2, len(frames) - 1})
                    seq_id = n_seq + r
                    save_png(np.concatenate([frames[i] for i in idx], axis=0),
                             Path(out_dir) / f"{mode}_seq{seq_id:03d}.png")
                    save_gif(frames, Path(out_dir) / f"{mode}_seq{seq_id:03d}.gif")
                vis_left -= len(frames_vis)
                n_seq += b
                if progress:
                    print(f"[evaluate] {mode}: {n_seq} sequences", file=sys.stderr)
            summary = {k: _nanmean(v) for k, v in per.items()}
            summary["sequences"] = n_seq
            if per_frame and frame_scores["FG-ARI"]:
                summary["per_frame"] = {k: [_nanmean(col.tolist()) for col in torch.cat(v).T]
                                        for k, v in frame_scores.items()}
            summary["seconds"] = round(time.perf_counter() - t_start, 3)
            results["modes"][mode] = summary
            n_total = n_seq
    finally:
        model.train(was_training)
    results["num_sequences"] = n_total
    return results


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table: one row per mode, one column per metric."""
    keys = [k for k in METRIC_KEYS if any(not math.isnan(r.get(k, math.nan)) for r in results["modes"].values())]
    header = ["mode"] + keys
    rows = [[mode] + [f"{r[k]:.4f}" if not math.isnan(r[k]) else "n/a" for k in keys]
            for mode, r in results["modes"].items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_json(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomic JSON write (NaN -> null)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(_json_safe(results), f, indent=2)

    return write_atomically(path, write)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locis_rl.evaluate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default",
                        help="model file (Loci-s or SAVi), 'default', a run directory or a training checkpoint.pt")
    parser.add_argument("--data", nargs="+", required=True, help="HDF5 file(s) from locis_rl.data.generate")
    parser.add_argument("--mode", action="append", nargs="+", choices=["rnd", "reg", "seg"],
                        help="slot-assignment mode(s) of Loci-s; repeatable; default: rnd reg seg "
                             "(SAVi has none: it is evaluated once)")
    parser.add_argument("--conditioning", default=None,
                        choices=["unconditional-learned", "unconditional-sampled", "boxes", "centers"],
                        help="SAVi only; default (and only possible value): the model's config. "
                             "boxes / centers use the ground-truth first-frame boxes / centres")
    parser.add_argument("--num-slots", type=int, default=None, metavar="K",
                        help="Loci-s only: run the checkpoint with K slots instead of its trained number "
                             "(every slot module is shared across slots, so the weights load unchanged)")
    parser.add_argument("--override", action="append", default=None, metavar="KEY=VALUE",
                        help="Loci-s only, repeatable: an inference-time config change of the checkpoint, "
                             "e.g. assignment.mode=reg or assignment.warmup_inference=5 (allowed keys: "
                             "locis_rl.model.config.INFERENCE_OVERRIDE_KEYS)")
    parser.add_argument("--per-frame", action="store_true",
                        help="also print and save FG-ARI / mIoU of every frame index on its own (data with "
                             "segmentation): where in the videos the model fails")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--out", help="directory for PNG / GIF visualisations")
    parser.add_argument("--visualize", type=int, default=2, help="sequences visualised per mode (with --out)")
    parser.add_argument("--max-sequences", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    args.device = cli_device(args.device)
    modes = [m for group in (args.mode or [["rnd", "reg", "seg"]]) for m in group]
    modes = list(dict.fromkeys(modes))
    try:
        for p in args.data:
            if not os.path.exists(p):
                raise FileNotFoundError(f"data file {p!r} does not exist; create one with "
                                        f"`python -m locis_rl.data.generate --env locis/MultiObject-v0 --out {p}`")
        from locis_rl.model.config import inference_overrides
        from locis_rl.pretrain.config import parse_overrides

        overrides = inference_overrides(parse_overrides(args.override), num_slots=args.num_slots)
        model = load_model(args.checkpoint, map_location=args.device, overrides=overrides)
        if _is_savi(model) and args.mode:
            raise ValueError("--mode: SAVi has no slot-assignment modes (rnd / reg / seg); it is evaluated "
                             "once (see --conditioning)")
        results = evaluate_model(model, args.data, modes, max_sequences=args.max_sequences,
                                 batch_size=args.batch_size, seed=args.seed, out_dir=args.out,
                                 visualize=args.visualize, progress=True, conditioning=args.conditioning,
                                 per_frame=args.per_frame)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["checkpoint"] = str(args.checkpoint)
    if overrides:
        results["overrides"] = overrides
    results["data"] = [str(p) for p in args.data]
    print(format_table(results))
    for mode, r in results["modes"].items():
        for key, values in r.get("per_frame", {}).items():
            print(f"{mode} {key} per frame: " + " ".join(f"{v:.2f}" for v in values))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.out:
        print(f"visualisations in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
