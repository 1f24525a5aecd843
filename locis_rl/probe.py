"""Linear / MLP probes: how much object information do the slots of a model carry?

Usage::

    python -m locis_rl.probe --checkpoint default --env locis/MultiObject-v0 --env-kwargs level=a \\
        --episodes 32 --frames 12 [--mode seg] [--seed 0] [--device auto] [--json probe.json]
    python -m locis_rl.probe --checkpoint tiny --episodes 4 --frames 4      # random-weight smoke run

``--checkpoint`` takes ``default`` (the shipped model), a file from ``LociS.save_pretrained`` /
``SAVi.save_pretrained``, a training run directory or training checkpoint (as
``python -m locis_rl.evaluate``), or a preset name (``tiny``, ``small``, ``paper``, ``savi-tiny``,
``savi-small``) for a randomly initialised model.

Method
------
1. **Roll-outs.** ``episodes`` episodes of the environment (``reset(seed=seed + episode)``, then
   ``frames - 1`` steps with actions drawn from the seeded action space, a no-op for
   ``locis/MultiObject-v0``) are played ``batch_size`` at a time, B independent envs stepping
   together. The model runs in eval mode (``torch.no_grad``) with one :meth:`step` per frame on the
   batch, from ``init_state(B, seed=seed + first episode of the batch)``.
2. **Matching.** Per frame and env, the model's visible masks ``[K+1,H,W]`` (background last)
   become a label map by argmax. The IoU of every slot's region with every ground-truth object
   visible in ``info["segmentation"]`` (ids > 0 with at least one pixel) is computed and the slots
   are matched to objects by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``,
   maximising total IoU); only pairs with ``IoU >= min_iou`` (default 0.2) and ``IoU > 0`` are
   kept. *Match rate* = matched pairs / visible object instances (summed over frames), also per
   object id (``match_rate_by_object``: is the agent's own effector ever in a slot?); *mean IoU* =
   mean over kept pairs.
3. **Samples.** Each kept pair is one sample: the slot's features ``gestalt [G]``, ``position [4]``
   (x, y, size, priority) and ``slot_depth [1]`` (also concatenated: ``all``), and the object's
   targets from ``info["objects"]`` at that frame: 3-D world ``position``, ``color`` (rgb in
   [0, 1]), ``size`` (half-extents) and ``shape`` (index into ``envs.scene.SHAPES``), plus the
   episode index.
4. **Probes.** The episodes are split into train / held-out test episodes (``test_fraction``, at
   least one each), so frames of one episode never sit on both sides. Regression targets use
   ``RidgeCV`` (linear) or a ``MLPRegressor`` with one hidden layer of 64 units, early stopping and
   a fixed ``random_state`` (mlp; targets standardised too); the shape uses ``LogisticRegression`` /
   ``MLPClassifier``. Features first lose their near-constant dimensions, then are standardised
   and clipped to +-10 (saturated Gestalt dimensions would otherwise explode on test samples). Reported on the held-out
   episodes: R^2 per target (``1 - SSE / SST`` per output dimension as ``r2_score``, averaged over the
   dimensions whose test variance is not ~0; ``position_xy`` scores the ground-plane x, y alone) and
   shape accuracy with its chance level (accuracy of always answering the most frequent training
   shape).
5. **Control.** The same pipeline on a randomly initialised model of the same config and class
   (``torch.manual_seed(seed + 1)``, so it differs from a preset model built with ``seed``), on
   the same episodes. Probe scores above the control's are what
   training put into the slots; scores of the control show what random features + the matching
   already give (the matched slot's masks alone carry position information).

Undefined numbers (too few samples, no matches) are ``NaN`` in Python, ``null`` in JSON and ``n/a``
in the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from locis_rl.devices import cli_device

__all__ = [
    "FEATURE_GROUPS",
    "REGRESSION_TARGETS",
    "match_slots",
    "collect_slot_features",
    "fit_probes",
    "load_probe_model",
    "random_control",
    "run_probe",
    "format_table",
    "write_json",
    "main",
]

FEATURE_GROUPS = ("gestalt", "position", "depth")
"""Slot feature groups; ``"all"`` is their concatenation (in this order)."""
REGRESSION_TARGETS = ("position", "color", "size")
CLASSIFICATION_TARGETS = ("shape",)
PROBES = ("linear", "mlp")
LOCIS_PRESETS = ("tiny", "small", "paper")
SAVI_PRESETS = {"savi-tiny": "tiny", "savi-small": "small"}
MIN_VARIANCE = 1e-12
"""Output dimensions with test variance below this are left out of the R^2 average."""
MIN_TRAIN, MIN_TEST = 5, 2
"""Fewer train / test samples than this -> the probe's scores are NaN."""
MLP_MAX_ITER, MLP_PATIENCE = 1000, 25
"""MLP probes: epoch limit and early-stopping patience (sklearn's default of 10 epochs stops
too early on a few hundred samples: ~2 updates per epoch)."""

DEFAULT_CHECKPOINT_HELP = (
    "the packaged Loci-s checkpoint {name!r} does not exist ({error}). Train one with "
    "`python -m locis_rl.pretrain` and pass it with `--checkpoint PATH` (a file, run directory or "
    "training checkpoint), or run a random-weight smoke test with `--checkpoint tiny`.")


# --------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------
def match_slots(masks: np.ndarray | torch.Tensor, segmentation: np.ndarray | torch.Tensor,
                min_iou: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Hungarian matching of slots to ground-truth objects of one frame by mask IoU.

    Args:
        masks: ``[K+1, H, W]`` visible masks (background last), soft or hard; the argmax over the
            first axis is each pixel's owner.
        segmentation: ``[H, W]`` integer ids, ``0`` = background, ``> 0`` objects.
        min_iou: matched pairs with a lower IoU are dropped (and pairs without overlap always).

    Returns:
        ``(slots, object_ids, ious, num_visible)``: int64 / int64 / float64 arrays of the kept pairs
        (sorted by slot) and the number of objects visible in ``segmentation``.
    """
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    seg = (segmentation.detach().cpu().numpy() if isinstance(segmentation, torch.Tensor)
           else np.asarray(segmentation))
    if masks.ndim != 3 or seg.shape != masks.shape[1:]:
        raise ValueError(f"masks [K+1,H,W] and segmentation [H,W] must agree, actual shapes: "
                         f"{masks.shape}, {seg.shape}")
    k = masks.shape[0] - 1
    owner = masks.argmax(axis=0).reshape(-1).astype(np.int64)  # k = background
    seg = seg.reshape(-1).astype(np.int64)
    ids = np.unique(seg[seg > 0])
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if ids.size == 0 or k == 0:
        return (*empty, int(ids.size))
    obj = np.searchsorted(ids, seg)  # column of the object; garbage where seg == 0 (masked below)
    fg = seg > 0
    n = ids.size
    inter = np.bincount(owner[fg] * n + obj[fg], minlength=(k + 1) * n).reshape(k + 1, n)[:k]
    slot_area = np.bincount(owner, minlength=k + 1)[:k]
    obj_area = np.bincount(obj[fg], minlength=n)
    union = slot_area[:, None] + obj_area[None, :] - inter
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = (iou[rows, cols] >= min_iou) & (iou[rows, cols] > 0)  # a zero-overlap pair is no match
    rows, cols = rows[keep], cols[keep]
    return rows.astype(np.int64), ids[cols].astype(np.int64), iou[rows, cols].astype(np.float64), int(n)


# --------------------------------------------------------------------------------------------
# roll-outs and feature collection
# --------------------------------------------------------------------------------------------
def _is_savi(model: Any) -> bool:
    conditioning = getattr(getattr(model, "config", None), "conditioning", None)
    return isinstance(conditioning, str)


def _make_env(env_id: str, env_kwargs: Mapping[str, Any]):
    import gymnasium as gym

    if env_id.startswith("locis/"):
        import envs  # noqa: F401 - registers the locis/... ids

    return gym.make(env_id, **dict(env_kwargs))


def _obs_tensors(obs: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rgb = np.stack([o["rgb"] for o in obs])
    depth = np.stack([o["depth"] for o in obs])
    rgb_t = torch.from_numpy(rgb).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    depth_t = torch.from_numpy(depth).to(device).permute(0, 3, 1, 2).float()
    return rgb_t.contiguous(), depth_t.contiguous()


def _check_info(info: Mapping[str, Any], env_id: str) -> None:
    missing = [key for key in ("segmentation", "objects") if key not in info]
    if missing:
        raise ValueError(f"{env_id}: info lacks {missing}; the probe needs the ground-truth "
                         f"segmentation and object table (e.g. locis/MultiObject-v0)")


@torch.no_grad()
def collect_slot_features(model: Any, env_id: str = "locis/MultiObject-v0",
                          env_kwargs: Mapping[str, Any] | None = None, episodes: int = 8,
                          frames: int = 8, seed: int = 0, mode: str | None = None,
                          device: str | torch.device | None = None, *, min_iou: float = 0.2,
                          batch_size: int = 4) -> dict[str, np.ndarray]:
    """Roll out ``episodes`` episodes, run ``model`` per frame and collect matched slot/object pairs.

    Args:
        model: a ``LociS`` or ``SAVi`` (anything with ``config.image_size``, ``init_state`` and
            ``step`` as in ``docs/architecture.md``).
        env_kwargs: passed to ``gym.make``; ``image_size`` defaults to ``model.config.image_size``.
        mode: slot assignment for ``LociS.step`` (``None``: the config's). SAVi gets ``None``; a
            ``boxes`` / ``centers`` SAVi is conditioned on the first frame's ground-truth boxes.
        device: where the model runs (``None``: where its parameters are).
        batch_size: envs stepped together.

    Returns:
        dict of numpy arrays, one row per kept pair: ``features`` (``all``, ``[N, G+5]``),
        ``features_gestalt [N,G]``, ``features_position [N,4]``, ``features_depth [N,1]``,
        ``target_position [N,3]``, ``target_color [N,3]``, ``target_size [N,3]``,
        ``target_shape [N]`` int64, ``target_static [N]`` bool, ``episode``, ``frame``, ``slot``,
        ``object_id [N]`` int64, ``iou [N]``; ``visible_object_id [V]`` int64, the id of every
        visible object instance (one per object and frame, so per-object match rates can be
        counted); and 0-d ``num_visible`` (``V``), ``num_matched``, ``num_frames``.
    """
    if episodes < 1 or frames < 1 or batch_size < 1:
        raise ValueError(f"episodes, frames and batch_size must be >= 1, actual values: "
                         f"{episodes}, {frames}, {batch_size}")
    cfg = model.config
    env_kwargs = dict(env_kwargs or {})
    env_kwargs.setdefault("image_size", cfg.image_size)
    if int(env_kwargs["image_size"]) != cfg.image_size:
        raise ValueError(f"env image_size {env_kwargs['image_size']} != model image_size {cfg.image_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    savi = _is_savi(model)
    step_mode = None if savi else mode
    k = cfg.num_slots

    rows: dict[str, list] = {key: [] for key in (
        "features_gestalt", "features_position", "features_depth", "target_position", "target_color",
        "target_size", "target_shape", "target_static", "episode", "frame", "slot", "object_id", "iou",
        "visible_object_id")}
    num_frames = 0
    batch = min(batch_size, episodes)
    env_list = [_make_env(env_id, env_kwargs) for _ in range(batch)]
    try:
        for first in range(0, episodes, batch):
            eps = list(range(first, min(first + batch, episodes)))
            envs_now = env_list[:len(eps)]
            obs, infos = [], []
            for env, ep in zip(envs_now, eps):
                o, info = env.reset(seed=seed + ep)
                env.action_space.seed(seed + ep)
                _check_info(info, env_id)
                obs.append(o)
                infos.append(info)
            active = np.ones(len(eps), dtype=bool)
            state = model.init_state(len(eps), device=device, seed=seed + first)
            for t in range(frames):
                rgb, depth = _obs_tensors(obs, device)
                kwargs: dict[str, Any] = {"mode": step_mode}
                if savi and cfg.conditioning in ("boxes", "centers") and t == 0:
                    from locis_rl.savi import boxes_from_segmentation

                    seg0 = torch.from_numpy(np.stack([i["segmentation"] for i in infos])).to(device)
                    boxes, centers, valid = boxes_from_segmentation(seg0, k)
                    kwargs["conditioning"] = {"boxes": boxes, "centers": centers, "valid": valid}
                out, state = model.step(rgb, depth, state, **kwargs)
                masks = out["masks"].float().cpu().numpy()
                gestalt = out["gestalt"].float().cpu().numpy()
                position = out["position"].float().cpu().numpy()
                slot_depth = out["slot_depth"].float().reshape(len(eps), k, -1).cpu().numpy()
                for b, ep in enumerate(eps):
                    if not active[b]:
                        continue
                    num_frames += 1
                    slots, ids, ious, _ = match_slots(masks[b], infos[b]["segmentation"], min_iou)
                    seg = np.asarray(infos[b]["segmentation"])
                    rows["visible_object_id"].append(np.unique(seg[seg > 0]).astype(np.int64))
                    if slots.size == 0:
                        continue
                    objects = infos[b]["objects"]
                    idx = np.searchsorted(np.asarray(objects["id"]), ids)
                    rows["features_gestalt"].append(gestalt[b, slots])
                    rows["features_position"].append(position[b, slots])
                    rows["features_depth"].append(slot_depth[b, slots])
                    rows["target_position"].append(np.asarray(objects["position"], np.float64)[idx])
                    rows["target_color"].append(np.asarray(objects["color"], np.float64)[idx])
                    rows["target_size"].append(np.asarray(objects["size"], np.float64)[idx])
                    rows["target_shape"].append(np.asarray(objects["shape"], np.int64)[idx])
                    rows["target_static"].append(np.asarray(objects["static"], bool)[idx])
                    rows["episode"].append(np.full(slots.size, ep, np.int64))
                    rows["frame"].append(np.full(slots.size, t, np.int64))
                    rows["slot"].append(slots)
                    rows["object_id"].append(ids)
                    rows["iou"].append(ious)
                if t + 1 == frames:
                    break
                for b, env in enumerate(envs_now):
                    if not active[b]:
                        continue
                    o, _, terminated, truncated, info = env.step(env.action_space.sample())
                    obs[b], infos[b] = o, info
                    if terminated or truncated:
                        active[b] = False  # the model keeps seeing the last frame; nothing is collected
    finally:
        for env in env_list:
            env.close()

    widths = {"features_gestalt": _group_width(model, "gestalt"), "features_position": 4, "features_depth": 1,
              "target_position": 3, "target_color": 3, "target_size": 3}
    result: dict[str, np.ndarray] = {}
    for key, parts in rows.items():
        if parts:
            result[key] = np.concatenate(parts)
        elif key in widths:
            result[key] = np.zeros((0, widths[key]), np.float32 if key.startswith("features") else np.float64)
        else:
            result[key] = np.zeros(0, bool if key == "target_static" else
                                   (np.float64 if key == "iou" else np.int64))
    result["features"] = np.concatenate([result[f"features_{g}"] for g in FEATURE_GROUPS], axis=1)
    result["num_visible"] = np.asarray(result["visible_object_id"].size)
    result["num_matched"] = np.asarray(result["slot"].size)
    result["num_frames"] = np.asarray(num_frames)
    return result


def _group_width(model: Any, group: str) -> int:
    """Width of a feature group for ``model`` (``gestalt``: ``gestalt_dim`` or SAVi ``slot_dim``)."""
    cfg = model.config
    if group == "gestalt":
        return int(getattr(cfg, "gestalt_dim", None) or getattr(cfg, "slot_dim"))
    return {"position": 4, "depth": 1}[group]


# --------------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------------
def split_episodes(groups: np.ndarray, test_fraction: float = 0.25, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train / test masks over samples; whole episodes (``groups``) go to one side.

    ``ceil(test_fraction * n_episodes)`` episodes (at least 1, at most ``n - 1``) are held out,
    chosen by a permutation seeded with ``seed``. With a single episode everything is train.
    """
    groups = np.asarray(groups)
    unique = np.unique(groups)
    if unique.size < 2:
        return np.ones(groups.shape, bool), np.zeros(groups.shape, bool)
    n_test = int(min(max(math.ceil(test_fraction * unique.size), 1), unique.size - 1))
    test_eps = np.random.default_rng(seed).permutation(unique)[:n_test]
    test = np.isin(groups, test_eps)
    return ~test, test


def _r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """R^2 per output dimension, averaged over the dimensions with non-constant test targets."""
    y_true = y_true.reshape(len(y_true), -1)
    y_pred = y_pred.reshape(len(y_pred), -1)
    var = y_true.var(axis=0)
    ok = var > MIN_VARIANCE * max(1.0, float(np.abs(y_true).max(initial=0.0)) ** 2)
    if not ok.any():
        return float("nan")
    sse = ((y_true - y_pred) ** 2).sum(axis=0)
    sst = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0)
    return float(np.mean(1.0 - sse[ok] / sst[ok]))


def _regressor(probe: str, seed: int, n_train: int):
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if probe == "linear":
        return make_pipeline(*_feature_scaling(), RidgeCV(alphas=np.logspace(-3, 3, 7)))
    mlp = MLPRegressor(hidden_layer_sizes=(64,), early_stopping=n_train >= 50, max_iter=MLP_MAX_ITER,
                       n_iter_no_change=MLP_PATIENCE, random_state=seed)
    return TransformedTargetRegressor(regressor=make_pipeline(*_feature_scaling(), mlp),
                                      transformer=StandardScaler())


MIN_FEATURE_VARIANCE = 1e-6
"""Features whose training variance is below this are dropped before standardising."""
MAX_STANDARDISED = 10.0
"""Standardised features are clipped to +- this many training standard deviations."""


def _feature_scaling() -> list:
    """Drop near-constant features, standardise, clip.

    Gestalt codes are sigmoids that often saturate: a dimension that sits at ~1e-6 in every
    training sample but not in a test sample would be standardised to ~1e5 and wreck a linear
    probe's test R² (measured: -18 with, 0.65 without the Gestalt code, for the same positions).
    """
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return [VarianceThreshold(MIN_FEATURE_VARIANCE), StandardScaler(),
            FunctionTransformer(np.clip, kw_args={"a_min": -MAX_STANDARDISED, "a_max": MAX_STANDARDISED})]


def _classifier(probe: str, seed: int, y_train: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline

    if probe == "linear":
        return make_pipeline(*_feature_scaling(), LogisticRegression(max_iter=1000))
    _, counts = np.unique(y_train, return_counts=True)
    # early stopping splits off a stratified validation set: every class needs >= 2 samples
    early = len(y_train) >= 50 and counts.min() >= 2
    return make_pipeline(*_feature_scaling(), MLPClassifier(hidden_layer_sizes=(64,), early_stopping=early,
                                                         max_iter=MLP_MAX_ITER, n_iter_no_change=MLP_PATIENCE,
                                                         random_state=seed))


def fit_probes(features: np.ndarray, targets: Mapping[str, np.ndarray], groups: np.ndarray, *,
               probes: Sequence[str] = PROBES, test_fraction: float = 0.25, seed: int = 0
               ) -> dict[str, dict[str, float]]:
    """Fit probes from slot features to object targets; score them on held-out episodes.

    Args:
        features: ``[N, F]``.
        targets: name -> ``[N, D]`` (or ``[N]``) regression targets, except ``"shape"`` (int
            labels ``[N]``, classification). Any subset of position / color / size / shape.
        groups: ``[N]`` episode index of each sample (split unit).
        probes: any of ``"linear"``, ``"mlp"``.

    Returns:
        ``{probe: {"<target>_r2": float, ..., "shape_acc", "shape_chance", "n_train", "n_test"}}``
        (NaN where there are too few samples or a target is constant on the test episodes).
    """
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:  # a dev extra of locis-rl, not a core dependency
        raise ImportError("the probes need scikit-learn: pip install scikit-learn "
                          "(or pip install -e '.[dev]')") from exc
    features = np.asarray(features, np.float64)
    groups = np.asarray(groups)
    if features.ndim != 2 or len(groups) != len(features):
        raise ValueError(f"features [N,F] and groups [N] must agree, actual shapes: "
                         f"{features.shape}, {groups.shape}")
    for name in probes:
        if name not in PROBES:
            raise ValueError(f"probes: expected a subset of {PROBES}, actual value: {name!r}")
    train, test = split_episodes(groups, test_fraction, seed)
    n_train, n_test = int(train.sum()), int(test.sum())
    enough = n_train >= MIN_TRAIN and n_test >= MIN_TEST
    results: dict[str, dict[str, float]] = {}
    for probe in probes:
        res: dict[str, float] = {"n_train": n_train, "n_test": n_test}
        for name, y in targets.items():
            y = np.asarray(y)
            if len(y) != len(features):
                raise ValueError(f"targets[{name!r}] has {len(y)} rows, features {len(features)}")
            if name in CLASSIFICATION_TARGETS:
                res[f"{name}_acc"], res[f"{name}_chance"] = _fit_classifier(
                    probe, features, y.astype(np.int64), train, test, seed, enough)
            else:
                res[f"{name}_r2"] = _fit_regressor(probe, features, y.astype(np.float64), train, test,
                                                   seed, enough)
        results[probe] = res
    return results


def _fit_regressor(probe, x, y, train, test, seed, enough) -> float:
    if not enough:
        return float("nan")
    y2 = y.reshape(len(y), -1)
    model = _regressor(probe, seed, int(train.sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of small MLPs
        model.fit(x[train], y2[train])
    return _r2(y2[test], model.predict(x[test]))


def _fit_classifier(probe, x, y, train, test, seed, enough) -> tuple[float, float]:
    if not enough:
        return float("nan"), float("nan")
    classes, counts = np.unique(y[train], return_counts=True)
    majority = classes[counts.argmax()]
    chance = float(np.mean(y[test] == majority))
    if classes.size < 2:
        return chance, chance  # one training class: the probe can only answer it
    model = _classifier(probe, seed, y[train])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x[train], y[train])
    return float(np.mean(model.predict(x[test]) == y[test])), chance


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def load_probe_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0,
                     num_slots: int | None = None):
    """``(model, trained)`` for a checkpoint spec (see the module docstring); ``trained`` is False
    for preset names (random weights from ``torch.manual_seed(seed)``).

    Args:
        num_slots: slots of a Loci-s model at inference (``None``: its config's).

    Raises:
        FileNotFoundError: no such file; for ``default`` / ``depth`` the message says how to get one.
        ValueError: ``num_slots`` for a SAVi model (its slot count is fixed by training).
    """
    from locis_rl.model.locis import pretrained_checkpoint

    spec = str(checkpoint)
    overrides = {} if num_slots is None else {"num_slots": num_slots}
    if spec in LOCIS_PRESETS:
        from locis_rl.model import LociS
        from locis_rl.model.config import LociSConfig, apply_inference_overrides

        torch.manual_seed(seed)
        return LociS(apply_inference_overrides(LociSConfig.preset(spec), overrides)).to(device), False
    savi_error = ValueError(f"num_slots={num_slots} applies to Loci-s models; {spec!r} is a SAVi model, "
                            "whose slot count is fixed by its training config: leave --num-slots out")
    if spec in SAVI_PRESETS:
        if overrides:
            raise savi_error
        from locis_rl.savi import SAVi

        torch.manual_seed(seed)
        return SAVi(SAVI_PRESETS[spec]).to(device), False
    path = Path(spec)
    if pretrained_checkpoint(spec) is None and path.is_file():
        try:
            head = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - the loaders below produce the error message
            head = None
        if isinstance(head, dict) and head.get("model") == "SAVi":
            from locis_rl.savi import SAVi

            if overrides:
                raise savi_error
            return SAVi.from_pretrained(path, map_location=device), True
    from locis_rl.evaluate import load_model

    try:
        return load_model(spec, map_location=device, overrides=overrides or None), True
    except FileNotFoundError as exc:
        if pretrained_checkpoint(spec) is not None:
            raise FileNotFoundError(DEFAULT_CHECKPOINT_HELP.format(name=spec, error=exc)) from exc
        raise


def random_control(model: Any, seed: int = 0):
    """A randomly initialised model of the same class and config (``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    return type(model)(model.config).to(device)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def _probe_model(model, label, *, env_id, env_kwargs, episodes, frames, seed, mode, device, min_iou,
                 probes, feature_sets, test_fraction, batch_size) -> dict[str, Any]:
    data = collect_slot_features(model, env_id, env_kwargs, episodes, frames, seed, mode, device,
                                 min_iou=min_iou, batch_size=batch_size)
    targets = {name: data[f"target_{name}"] for name in REGRESSION_TARGETS + CLASSIFICATION_TARGETS}
    # On a table the height barely varies (a near-constant z makes the 3-D R² meaningless): the
    # ground-plane position gets its own score.
    targets["position_xy"] = data["target_position"][:, :2]
    visible, matched = int(data["num_visible"]), int(data["num_matched"])
    probes_out = {}
    for fs in feature_sets:
        x = data["features"] if fs == "all" else data[f"features_{fs}"]
        probes_out[fs] = fit_probes(x, targets, data["episode"], probes=probes,
                                    test_fraction=test_fraction, seed=seed)
    visible_ids, visible_counts = np.unique(data["visible_object_id"], return_counts=True)
    matched_counts = dict(zip(*np.unique(data["object_id"], return_counts=True)))
    return {
        "model": label,
        "match_rate": matched / visible if visible else float("nan"),
        "match_rate_by_object": {int(i): matched_counts.get(i, 0) / int(n)
                                 for i, n in zip(visible_ids, visible_counts)},
        "mean_iou": float(data["iou"].mean()) if matched else float("nan"),
        "num_visible": visible,
        "num_matched": matched,
        "num_frames": int(data["num_frames"]),
        "num_episodes": int(np.unique(data["episode"]).size),
        "probes": probes_out,
    }


def run_probe(checkpoint: Any = "default", env_id: str = "locis/MultiObject-v0",
              env_kwargs: Mapping[str, Any] | None = None, episodes: int = 16, frames: int = 8,
              seed: int = 0, mode: str | None = None, device: str | torch.device = "cpu", *,
              control: bool = True, min_iou: float = 0.2, probes: Sequence[str] = PROBES,
              feature_sets: Sequence[str] = ("all",), test_fraction: float = 0.25,
              batch_size: int = 4, num_slots: int | None = None) -> dict[str, Any]:
    """Probe a model (and a random-weight control of the same config).

    Args:
        checkpoint: a checkpoint spec for :func:`load_probe_model` or a model object.
        num_slots: slots at inference for a checkpoint spec (``None``: its config's; a model
            object keeps its own).
        feature_sets: any of ``"all"``, ``"gestalt"``, ``"position"``, ``"depth"``.
        Others: see :func:`collect_slot_features` and :func:`fit_probes`.

    Returns:
        ``{"settings": {...}, "results": [model result, control result]}``; a model result holds
        ``model`` (label), ``match_rate``, ``match_rate_by_object`` (``{object id: rate}``, ids
        of ``info["segmentation"]``), ``mean_iou``, counts and ``probes[feature_set][probe]``
        (see :func:`fit_probes`).
    """
    for fs in feature_sets:
        if fs != "all" and fs not in FEATURE_GROUPS:
            raise ValueError(f"feature_sets: expected 'all' or one of {FEATURE_GROUPS}, actual value: {fs!r}")
    if isinstance(checkpoint, torch.nn.Module):
        model, trained, name = checkpoint.to(device), True, type(checkpoint).__name__
    else:
        model, trained = load_probe_model(checkpoint, device, seed, num_slots)
        name = str(checkpoint)
    label = name if trained else f"{name} (random)"
    common = dict(env_id=env_id, env_kwargs=env_kwargs, episodes=episodes, frames=frames, seed=seed,
                  mode=mode, device=device, min_iou=min_iou, probes=tuple(probes),
                  feature_sets=tuple(feature_sets), test_fraction=test_fraction, batch_size=batch_size)
    results = [_probe_model(model, label, **common)]
    if control:
        results.append(_probe_model(random_control(model, seed + 1), "control (random init)", **common))
    cfg = model.config
    settings = dict(checkpoint=name, model_class=type(model).__name__, trained=trained, env_id=env_id,
                    env_kwargs={"image_size": cfg.image_size, **dict(env_kwargs or {})},
                    episodes=episodes, frames=frames, seed=seed,
                    mode=mode if mode is not None else getattr(getattr(cfg, "assignment", None), "mode",
                                                               getattr(cfg, "conditioning", None)),
                    min_iou=min_iou, probes=list(probes), feature_sets=list(feature_sets),
                    test_fraction=test_fraction, num_slots=cfg.num_slots)
    return {"settings": settings, "results": results}


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def format_table(report: Mapping[str, Any]) -> str:
    """Markdown table: rows model x probe (x feature set when several), columns the scores."""
    header = ["model", "probe", "position R²", "position xy R²", "colour R²", "size R²", "shape acc (chance)",
              "match rate", "mean IoU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    several = len(report["settings"]["feature_sets"]) > 1
    for res in report["results"]:
        for fs, by_probe in res["probes"].items():
            for probe, s in by_probe.items():
                name = f"{probe} ({fs})" if several else probe
                shape = f"{_fmt(s.get('shape_acc'))} ({_fmt(s.get('shape_chance'))})"
                lines.append("| " + " | ".join([res["model"], name, _fmt(s.get("position_r2")),
                                                _fmt(s.get("position_xy_r2")),
                                                _fmt(s.get("color_r2")), _fmt(s.get("size_r2")), shape,
                                                _fmt(res["match_rate"]), _fmt(res["mean_iou"])]) + " |")
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def write_json(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as JSON (NaN -> null). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """``3`` -> int, ``0.5`` -> float, ``true`` / ``none`` -> bool / None, ``3,6`` -> tuple, else str."""
    if "," in text:
        return tuple(_parse_value(part) for part in text.split(",") if part)
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_env_kwargs(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env-kwargs: expected key=value, actual value: {item!r}")
        out[key] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m locis_rl.probe",
                                description="Linear / MLP probes from matched slots to object properties.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="default",
                   help="PATH | default | tiny/small/paper/savi-tiny/savi-small (random weights)")
    p.add_argument("--env", default="locis/MultiObject-v0")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="e.g. level=a num_objects=3,6 (image_size defaults to the model's)")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--frames", type=int, default=8, help="frames per episode")
    p.add_argument("--mode", choices=("rnd", "reg", "seg"), default=None,
                   help="LociS slot assignment (default: the model config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--min-iou", type=float, default=0.2)
    p.add_argument("--num-slots", type=int, default=None,
                   help="slots of a Loci-s model at inference (default: its config's)")
    p.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    p.add_argument("--features", nargs="+", choices=("all",) + FEATURE_GROUPS, default=["all"],
                   help="feature sets to probe (one table row group each)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held-out episode fraction")
    p.add_argument("--batch-size", type=int, default=4, help="envs stepped together")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--no-control", action="store_true", help="skip the random-init control")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.device = cli_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run_probe(args.checkpoint, args.env, parse_env_kwargs(args.env_kwargs), args.episodes,
                           args.frames, args.seed, args.mode, args.device, control=not args.no_control,
                           min_iou=args.min_iou, probes=args.probes, feature_sets=args.features,
                           test_fraction=args.test_fraction, batch_size=args.batch_size,
                           num_slots=args.num_slots)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = report["settings"]
    print(f"# slot probes: {s['checkpoint']} on {s['env_id']} {s['env_kwargs']}, {s['episodes']} episodes x "
          f"{s['frames']} frames, mode={s['mode']}, seed={s['seed']}, held-out episode fraction "
          f"{s['test_fraction']}\n")
    print(format_table(report))
    for res in report["results"]:
        rates = ", ".join(f"{i}: {r:.2f}" for i, r in res["match_rate_by_object"].items())
        print(f"\n{res['model']}: match rate by object id ({s['env_id']} segmentation ids): {rates or 'n/a'}")
    if args.json:
        print(f"\nwrote {write_json(report, args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
