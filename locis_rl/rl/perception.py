"""One per-env slot-state core shared by the Gymnasium, vector, SB3 and TorchRL adapters.

:class:`SlotPerception` holds a Loci-s model, its device and the recurrent slot state of ``num_envs``
rows. Every adapter is a thin layer over it: it turns whatever the environment produces into
``frames [N, H, W, 3]`` (+ optional metric ``depth [N, H, W, 1]``), calls :meth:`SlotPerception.reset`
for the rows that start an episode and :meth:`SlotPerception.step` for the others, and hands the
per-slot features back as numpy (Gymnasium / SB3) or torch (TorchRL).

Features of one row (``K = config.num_slots``, ``G = config.gestalt_dim``), all float32:

    gestalt   [K, G]   Gestalt code (mask | depth | RGB parts)
    position  [K, 4]   (x, y, size, priority), x, y in [-1, 1], x to the right, y down
    depth     [K, 1]   per-slot depth (the model's ``slot_depth``)
    presence  [K]      1 for a slot that holds an object, 0 for a free slot

With ``flatten=True`` the features of a row are one vector of length ``K * (G + 6)``: for each slot
in turn ``gestalt | position | depth | presence`` (see :func:`flatten_features`).

Preprocessing (on the model's device): uint8 frames are divided by 255, float frames must already
lie in [0, 1]; channel-last (``HWC``) and channel-first (``CHW``) frames are both accepted. Frames of
another size than ``config.image_size`` are resized to a square ``image_size x image_size`` with
bilinear, anti-aliased interpolation (the aspect ratio is not kept); depth maps are resized with
nearest-neighbour interpolation so that invalid pixels (inf / 0 / NaN, which the model ignores) are
never blended into valid ones.

Seeding: every row has its own seed stream. Row ``i`` reset with seed ``s`` starts episode 0 of
stream ``s``; each later reset without a seed starts the next episode of the same stream, and the
model state of that episode is ``model.init_state(1, seed=derive(s, episode))``. Seeding a vector
of envs with ``s`` gives row ``i`` the stream ``s + i`` (as Gymnasium and SB3 seed their sub-envs),
so a vectorised run reproduces the same envs run one by one.

Example:
    >>> from locis_rl.model.locis import LociS
    >>> perception = SlotPerception(LociS("tiny"), num_envs=2, device="cpu")
    >>> frames = np.zeros((2, 64, 64, 3), np.uint8)
    >>> feats = perception.reset(frames, seed=0)
    >>> feats["gestalt"].shape, feats["presence"].dtype
    ((2, 6, 96), dtype('float32'))
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from locis_rl.devices import resolve_device
from locis_rl.model.locis import MODES

__all__ = [
    "FEATURE_KEYS",
    "SlotPerception",
    "load_model",
    "load_locis",
    "resolve_device",
    "flatten_features",
    "slot_palette",
    "draw_slots",
]

FEATURE_KEYS = ("gestalt", "position", "depth", "presence")
"""Names of the per-slot features, in the order used by the flat layout."""

_MAX_SEED = 2**32


def load_model(model: Any = "default", overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """A slot model (Loci-s, or SAVi): an instance, ``"default"`` / ``"depth"``, a checkpoint or run dir.

    Args:
        overrides: inference-time config changes of a Loci-s model given by name / path, e.g.
            ``{"num_slots": 10}`` (see :meth:`LociS.from_pretrained`). The spaces of the adapters
            follow the loaded model's config, so they have the overridden ``K``.

    Raises:
        FileNotFoundError: no checkpoint exists there (the message says how to get a model).
        TypeError: ``model`` is neither a module nor a name / path.
        ValueError: ``overrides`` with a model instance or a SAVi checkpoint; a disallowed key
            (``ConfigError``).
    """
    if isinstance(model, torch.nn.Module):
        if overrides:
            raise ValueError(
                f"num_slots / model_overrides ({sorted(overrides)}) apply to a model given by name or "
                "path; this model is an instance: build it with the config you want, e.g. "
                "LociS.from_pretrained(path, overrides={'num_slots': 10})")
        module = model
    elif isinstance(model, (str, os.PathLike)):
        # evaluate's loader also reads run directories, training checkpoints and SAVi files
        from locis_rl.evaluate import load_model as load_checkpoint

        try:
            module = load_checkpoint(model, overrides=overrides)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"no Loci-s checkpoint found for model={model!r} ({exc}). Train one and pass its path, "
                "or pass a model instance, e.g. model=LociS('tiny') (random weights, for tests)."
            ) from exc
    else:
        raise TypeError(f"model: expected a LociS instance, 'default' or a checkpoint path, "
                        f"actual value: {model!r}")
    for attr in ("config", "init_state", "step"):
        if not hasattr(module, attr):
            raise TypeError(f"model: expected a LociS-like module with `{attr}`, actual value: "
                            f"{type(module).__name__}")
    return module


def load_locis(checkpoint: str, warmup: int = 0, num_slots: int = 0, seed: int | None = 0) -> torch.nn.Module:
    """A frozen Loci-s in eval mode: ``"tiny"`` (random weights), ``"default"``, ``"depth"`` or a path.

    Args:
        warmup, num_slots: slot warm-up iterations on the first frame and slot count (0: the
            checkpoint's own), applied as inference-time overrides.
        seed: the random weights of ``"tiny"`` come from ``torch.manual_seed(seed)`` without
            touching the global RNG; ``None`` draws them from the global RNG instead.

    Raises:
        FileNotFoundError: the checkpoint does not exist (the message says how to get one).
    """
    overrides: dict[str, Any] = {}
    if num_slots > 0:
        overrides["num_slots"] = num_slots
    if warmup > 0:
        overrides["assignment.warmup_inference"] = warmup
    if checkpoint == "tiny":
        from locis_rl.model.config import LociSConfig, apply_inference_overrides
        from locis_rl.model.locis import LociS

        config = apply_inference_overrides(LociSConfig.preset("tiny"), overrides)
        if seed is None:
            model = LociS(config)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = LociS(config)
    else:
        model = load_model(checkpoint, overrides)
    return model.eval().requires_grad_(False)


def _episode_seed(stream: int, episode: int) -> int:
    """Seed of episode ``episode`` of seed stream ``stream`` (independent of any other row)."""
    return int(np.random.SeedSequence([int(stream), int(episode)]).generate_state(1, np.uint32)[0])


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, actual value: {seed!r}")
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative int, actual value: {seed!r}")
    return int(seed)


def _as_tensor(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    x = np.asarray(x)
    if x.dtype == object:
        raise TypeError(f"expected a numeric array, actual dtype: {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _channels_last(x: torch.Tensor) -> bool:
    """Layout of a batched image ``[N, ?, ?, ?]``: True for ``HWC``, False for ``CHW``."""
    last_small, first_small = x.shape[-1] <= 4, x.shape[-3] <= 4
    if last_small != first_small:
        return last_small
    return x.dtype == torch.uint8  # both small (tiny images): uint8 images are HWC by convention


def prepare_frames(frames: Any, image_size: int, device: torch.device) -> torch.Tensor:
    """``frames [N, H, W, 3] | [N, 3, H, W]`` uint8 or float in [0, 1] -> float ``[N, 3, S, S]``.

    Raises:
        TypeError: not uint8 / floating point.
        ValueError: wrong rank, not 3 channels, NaN / inf values, or floats outside [0, 1].
    """
    x = _as_tensor(frames, device)
    if x.ndim != 4:
        raise ValueError(f"frames: expected a batch [N, H, W, 3] (or [N, 3, H, W]), actual shape: "
                         f"{tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"frames: expected uint8 (0..255) or float (0..1) pixels, actual dtype: "
                        f"{x.dtype}; convert with frame.astype(np.uint8)")
    if _channels_last(x):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"frames: expected 3 colour channels (RGB), actual shape: {tuple(x.shape)}; "
                         "convert grayscale / RGBA frames to RGB first")
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("frames: contain NaN or inf values; check the environment's renderer")
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"frames: float pixels must lie in [0, 1], actual range: [{lo:g}, {hi:g}]; "
                             "pass uint8 frames or divide by 255")
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True)
    return x.clamp_(0.0, 1.0).contiguous()


def prepare_depth(depth: Any, image_size: int, device: torch.device) -> torch.Tensor:
    """Metric ``depth [N, H, W, 1] | [N, 1, H, W] | [N, H, W]`` float -> ``[N, 1, S, S]``."""
    x = _as_tensor(depth, device)
    if not x.is_floating_point():
        raise TypeError(f"depth: expected float metric depth, actual dtype: {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and _channels_last(x):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"depth: expected [N, H, W, 1] or [N, 1, H, W], actual shape: {tuple(x.shape)}")
    x = x.float()
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="nearest-exact")
    return x.contiguous()


def flatten_features(features: Mapping[str, Any]) -> Any:
    """``{gestalt [*, K, G], position [*, K, 4], depth [*, K, 1], presence [*, K]}`` -> ``[*, K*(G+6)]``."""
    parts = [features["gestalt"], features["position"], features["depth"], features["presence"][..., None]]
    if isinstance(parts[0], torch.Tensor):
        flat = torch.cat(parts, -1)
        return flat.reshape(*flat.shape[:-2], -1)
    flat = np.concatenate(parts, -1)
    return flat.reshape(*flat.shape[:-2], -1)


def features_space(num_slots: int, gestalt_dim: int, flatten: bool = False) -> gym.spaces.Space:
    """Observation space of one row's features (see module docstring)."""
    if flatten:
        return gym.spaces.Box(-np.inf, np.inf, (num_slots * (gestalt_dim + 6),), np.float32)
    return gym.spaces.Dict({
        "gestalt": gym.spaces.Box(-np.inf, np.inf, (num_slots, gestalt_dim), np.float32),
        "position": gym.spaces.Box(-np.inf, np.inf, (num_slots, 4), np.float32),
        "depth": gym.spaces.Box(-np.inf, np.inf, (num_slots, 1), np.float32),
        "presence": gym.spaces.Box(0.0, 1.0, (num_slots,), np.float32),
    })


def slot_palette(num_slots: int, device: torch.device | None = None) -> torch.Tensor:
    """``num_slots`` well separated RGB colours in [0, 1], ``[K, 3]`` (golden-ratio hues)."""
    hue = (torch.arange(num_slots, dtype=torch.float32, device=device) * 0.618034) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], device=device) + hue[:, None] * 6.0) % 6.0
    return 0.95 - 0.8 * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def draw_slots(rgb: torch.Tensor, masks: torch.Tensor, position: torch.Tensor, presence: torch.Tensor,
               alpha: float = 0.5, marker: int = 2) -> np.ndarray:
    """Overlay slot masks (colours) and positions (crosses) on frames; vectorised over rows and slots.

    Args:
        rgb: ``[N, 3, H, W]`` in [0, 1]; masks: ``[N, K+1, H, W]`` (background last);
        position: ``[N, K, 4]``; presence: ``[N, K]``.
    Returns:
        uint8 ``[N, H, W, 3]``.
    """
    n, _, h, w = rgb.shape
    k = position.shape[1]
    palette = slot_palette(k, rgb.device)                                   # [K, 3]
    present = (presence > 0.5).float()                                      # [N, K]
    obj = masks[:, :k].float() * present[:, :, None, None]                  # [N, K, H, W]
    colour = torch.einsum("nkhw,kc->nchw", obj, palette)
    weight = obj.sum(1, keepdim=True).clamp(0.0, 1.0) * alpha
    image = rgb * (1.0 - weight) + colour * alpha
    # Crosses at the slot positions: x, y in [-1, 1] -> pixel centres.
    cx = ((position[..., 0].float() + 1.0) * 0.5 * w - 0.5).round()         # [N, K]
    cy = ((position[..., 1].float() + 1.0) * 0.5 * h - 0.5).round()
    u = torch.arange(w, device=rgb.device, dtype=torch.float32)
    v = torch.arange(h, device=rgb.device, dtype=torch.float32)
    du = (u[None, None, None, :] - cx[:, :, None, None]).abs()             # [N, K, 1, W]
    dv = (v[None, None, :, None] - cy[:, :, None, None]).abs()             # [N, K, H, 1]
    cross = ((du == 0) & (dv <= marker)) | ((dv == 0) & (du <= marker))     # [N, K, H, W]
    cross = cross & (present[:, :, None, None] > 0)
    hit = cross.any(1, keepdim=True)                                        # [N, 1, H, W]
    first = cross.float().argmax(1)                                         # [N, H, W]
    marker_colour = palette[first].permute(0, 3, 1, 2) * 0.5                # darker slot colour
    image = torch.where(hit, marker_colour, image)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class SlotPerception:
    """Recurrent Loci-s perception for ``num_envs`` rows: model, device, slot state, preprocessing.

    Args:
        model: a ``LociS`` instance, ``"default"`` / ``"depth"`` or a checkpoint path (see :func:`load_model`).
            The model is put in eval mode and moved to ``device``; it runs under inference mode.
        num_envs: rows of slot state (environments).
        device: ``"auto"`` (CUDA if available), or any torch device.
        mode: initial slot-assignment mode passed to ``model.step`` (``"seg"``, ``"reg"``, ``"rnd"``,
            or None for the model's default).
        seed: base seed; row ``i`` uses stream ``seed + i`` until reset with another seed.
            None draws one from OS entropy.
        num_slots: for a model given by name / path: run it with this many slots ``K`` instead of
            its trained number (the weights load unchanged; see :meth:`LociS.from_pretrained`).
            None: the checkpoint's.
        model_overrides: for a model given by name / path: other inference-time config changes,
            e.g. ``{"assignment.warmup_inference": 5}`` (keys:
            :data:`~locis_rl.model.config.INFERENCE_OVERRIDE_KEYS`).

    Frames: ``[N, H, W, 3]`` / ``[N, 3, H, W]``, uint8 or float in [0, 1], resized to the model's
    ``image_size`` if needed. Depth: ``[N, H, W, 1]`` metric, required iff ``config.use_depth``.
    ``num_slots`` / ``features_space`` follow the loaded model's config (after the overrides).
    """

    def __init__(self, model: Any = "default", *, num_envs: int = 1, device: str | torch.device = "auto",
                 mode: str | None = "seg", seed: int | None = None, num_slots: int | None = None,
                 model_overrides: Mapping[str, Any] | None = None):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs: expected a positive int, actual value: {num_envs!r}")
        from locis_rl.model.config import inference_overrides

        overrides = inference_overrides(model_overrides, num_slots=num_slots)
        self.device = resolve_device(device)
        self.model = load_model(model, overrides).to(self.device).eval()
        self.model.requires_grad_(False)
        config = self.model.config
        self.num_slots = int(config.num_slots)
        self.gestalt_dim = int(config.gestalt_dim)
        self.image_size = int(config.image_size)
        self.use_depth = bool(config.use_depth)
        # Slot-assignment modes are Loci-s's; models without them (SAVi) get mode=None.
        self.mode = mode if hasattr(config, "assignment") else None
        if self.mode is not None and self.mode not in MODES:  # fail here, not at the first reset()
            raise ValueError(f"mode: expected one of {MODES} (or None: the model's own), actual value: {mode!r}")
        # The features never read the current frame's RGB reconstruction: skip its decoder.
        self._step_options = {"reconstruct_rgb": False} if hasattr(config, "assignment") else {}
        self.num_envs = int(num_envs)
        base = int(np.random.SeedSequence().entropy % _MAX_SEED) if seed is None else _check_seed(seed)
        self._stream = np.array([base + i for i in range(self.num_envs)], dtype=np.int64)
        self._episode = np.full(self.num_envs, -1, dtype=np.int64)  # incremented on each reset
        self.state: TensorDict | None = None
        self.last_rgb: torch.Tensor | None = None                  # [N, 3, S, S] model input
        self.last_output: dict[str, torch.Tensor] | None = None    # masks / position / presence
        self._features: dict[str, np.ndarray] | None = None

    # ---- spaces ----------------------------------------------------------------------------
    def features_space(self, num_envs: int | None = None, flatten: bool = False) -> gym.spaces.Space:
        """Space of one row's features, or batched over ``num_envs`` rows."""
        space = features_space(self.num_slots, self.gestalt_dim, flatten)
        if num_envs is None:
            return space
        return gym.vector.utils.batch_space(space, num_envs)

    # ---- functional core (also used by TorchRL, where the state lives in the tensordict) --
    def preprocess(self, frames: Any, depth: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate, move to the device, convert and resize; see the module docstring."""
        rgb = prepare_frames(frames, self.image_size, self.device)
        if not self.use_depth:
            return rgb, None
        if depth is None:
            raise ValueError("the model uses depth (config.use_depth=True) but no depth was given; "
                             "use an env with a 'depth' observation or a model trained without depth")
        d = prepare_depth(depth, self.image_size, self.device)
        if d.shape[0] != rgb.shape[0]:
            raise ValueError(f"depth: expected {rgb.shape[0]} rows like the frames, actual shape: "
                             f"{tuple(d.shape)}")
        return rgb, d

    def next_seeds(self, rows: np.ndarray, seed: int | Sequence[int] | None = None) -> list[int]:
        """Advance the seed streams of ``rows`` (indices) by one episode; returns the episode seeds.

        ``seed`` (int: row ``i`` gets ``seed + i``; sequence: one per row of ``rows``) restarts them.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if seed is not None:
            if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
                streams = [_check_seed(seed) + int(i) for i in rows]
            else:
                streams = [_check_seed(s) for s in seed]
                if len(streams) != len(rows):
                    raise ValueError(f"seed: expected {len(rows)} seeds, actual value: {seed!r}")
            self._stream[rows] = streams
            self._episode[rows] = -1
        self._episode[rows] += 1
        return [_episode_seed(self._stream[i], self._episode[i]) for i in rows]

    def initial_state(self, seeds: Sequence[int]) -> TensorDict:
        """Fresh slot state ``[len(seeds)]``; row ``j`` gets the per-row RNG seed ``seeds[j]``."""
        seeds = torch.as_tensor(np.asarray(seeds, dtype=np.int64), device=self.device)
        return self.model.init_state(len(seeds), self.device, seed=seeds)

    def run(self, rgb: torch.Tensor, depth: torch.Tensor | None, state: TensorDict
            ) -> tuple[dict[str, torch.Tensor], TensorDict, TensorDict]:
        """One model step on preprocessed input -> (features (float32 torch), model output, state)."""
        out, state = self.model.step(rgb, depth, state, mode=self.mode, **self._step_options)
        features = {
            "gestalt": out["gestalt"].float(),
            "position": out["position"].float(),
            "depth": out["slot_depth"].float().reshape(rgb.shape[0], self.num_slots, 1),
            "presence": out["presence"].float(),
        }
        return features, out, state

    # ---- stateful API (Gymnasium / SB3) ----------------------------------------------------
    def reset(self, frames: Any, depth: Any = None, mask: Any = None,
              seed: int | Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Start new episodes in the rows of ``mask`` (all rows if None) on their first frames.

        ``frames`` / ``depth`` hold all ``num_envs`` rows; only the masked rows are read. Other rows
        keep their state, and their features of the last call are returned unchanged.
        Returns the features of all rows (numpy float32, a fresh copy).
        """
        rows = self._rows(mask)
        if self.state is None and len(rows) != self.num_envs:
            raise RuntimeError("reset with a mask before the first full reset; reset all rows first")
        if len(rows) == 0:
            return self._copy_features()
        rgb, d = self._select(frames, depth, rows)
        with torch.inference_mode():
            fresh = self.initial_state(self.next_seeds(rows, seed))
            feats, out, fresh = self.run(rgb, d, fresh)
            if len(rows) == self.num_envs:
                self.state = fresh
            else:
                self.state[torch.as_tensor(rows, device=self.device)] = fresh
        self._store(rows, rgb, out, feats)
        return self._copy_features()

    def step(self, frames: Any, depth: Any = None, reset_mask: Any = None) -> dict[str, np.ndarray]:
        """Advance every row by one frame in one batched model step; returns all rows' features.

        Rows of ``reset_mask`` start a new episode on this frame: their state is re-initialised
        (next episode of their seed stream) right before the step, which is then their first.
        """
        if self.state is None:
            raise RuntimeError("step() before reset(); call reset() first")
        rows = np.arange(self.num_envs)
        rgb, d = self._select(frames, depth, rows)
        with torch.inference_mode():
            fresh_rows = self._rows(reset_mask) if reset_mask is not None else rows[:0]
            if len(fresh_rows):
                fresh = self.initial_state(self.next_seeds(fresh_rows))
                self.state[torch.as_tensor(fresh_rows, device=self.device)] = fresh
            feats, out, self.state = self.run(rgb, d, self.state)
        self._store(rows, rgb, out, feats)
        return self._copy_features()

    def render(self) -> np.ndarray:
        """uint8 ``[N, S, S, 3]``: the last model input with slot masks and positions drawn."""
        if self.last_rgb is None:
            raise RuntimeError("nothing to render before the first reset()")
        out = self.last_output
        return draw_slots(self.last_rgb, out["masks"], out["position"], out["presence"])

    # ---- helpers ---------------------------------------------------------------------------
    def _rows(self, mask: Any) -> np.ndarray:
        if mask is None:
            return np.arange(self.num_envs)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
            raise ValueError(f"mask: expected a bool array of shape ({self.num_envs},), actual value: "
                             f"{mask!r}")
        return np.flatnonzero(mask)

    def _select(self, frames: Any, depth: Any, rows: np.ndarray):
        n = frames.shape[0] if hasattr(frames, "shape") else len(frames)
        if n != self.num_envs:
            raise ValueError(f"frames: expected {self.num_envs} rows, actual shape: "
                             f"{tuple(getattr(frames, 'shape', (n,)))}")
        if len(rows) != self.num_envs:
            frames = frames[rows]
            depth = None if depth is None else depth[rows]
        return self.preprocess(frames, depth)

    def _store(self, rows: np.ndarray, rgb: torch.Tensor, out: TensorDict, feats: dict) -> None:
        keep = {"masks": out["masks"], "position": out["position"], "presence": out["presence"]}
        numpy_feats = {k: v.cpu().numpy() for k, v in feats.items()}
        if len(rows) == self.num_envs or self.last_rgb is None:
            self.last_rgb = rgb
            self.last_output = dict(keep)
            self._features = numpy_feats
            return
        idx = torch.as_tensor(rows, device=self.device)
        with torch.inference_mode():
            self.last_rgb = self.last_rgb.clone()
            self.last_rgb[idx] = rgb
            for k, v in keep.items():
                self.last_output[k] = self.last_output[k].clone()
                self.last_output[k][idx] = v.to(self.last_output[k].dtype)
        for k, v in numpy_feats.items():
            self._features[k][rows] = v

    def _copy_features(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._features.items()}
