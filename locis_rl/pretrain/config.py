"""Typed training configuration (``TrainConfig``) and training presets (``configs/train/*.yaml``).

Every default lives here, once; the defaults are the reference implementation's values
(``shared/REFERENCE.md``: RAdam lr 1e-4, weight decay 1e-3, Lookahead alpha 0.5 / k 6, truncated
BPTT window 2, sequence length 24). A preset YAML holds only overrides, and the model section
starts from a model preset (``model_preset``, ``configs/model/<name>.yaml``) before the preset's
and the command line's ``model.*`` overrides are applied. Warm-up iterations are *not* repeated
here: the full stage uses ``model.assignment.warmup_train``.

Command-line overrides are ``key=value`` with dotted keys, e.g.
``model.num_slots=8 stages.full.steps=200 optim.lr=3e-4``; an unknown key raises
:class:`~locis_rl.model.config.ConfigError` naming the valid keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from locis_rl.model.config import ConfigError, LociSConfig, apply_overrides, config_search_dirs

__all__ = [
    "DataConfig",
    "OptimConfig",
    "BackgroundStageConfig",
    "ObjectsStageConfig",
    "ProposalStageConfig",
    "FullStageConfig",
    "SAViStageConfig",
    "StagesConfig",
    "EvalConfig",
    "TrainConfig",
    "load_train_config",
    "parse_overrides",
    "ConfigError",
    "STAGES",
]

STAGES = ("background", "objects", "proposal", "full")
"""The paper's training stages in the order ``--stage all`` runs them."""

MODEL_FAMILIES = ("locis", "savi")
"""``model_family``: ``locis`` (the stages above) or ``savi`` (the SAVi baseline, one ``savi`` stage)."""


@dataclass
class DataConfig:
    """Where the videos come from. ``paths`` empty: generate (and cache) from ``env_id``."""

    paths: tuple[str, ...] = ()
    """HDF5 files written by ``python -m locis_rl.data.generate`` (``--data`` on the CLI)."""
    env_id: str = "locis/MultiObject-v0"
    """Env recorded when ``paths`` is empty."""
    levels: tuple[str, ...] = ("a",)
    """Difficulty levels of ``env_id`` to record (one cached file per level, mixed in training)."""
    episodes: int = 48
    """Episodes recorded per level."""
    frames: int = 12
    """Frames per recorded episode."""
    seed: int = 0
    """Seed of the recorded episodes (part of the cache key)."""
    workers: int = 1
    """Processes used by the generator."""
    cache_dir: str = ""
    """Cache of generated files; empty: ``$LOCIS_RL_CACHE/data`` or ``~/.cache/locis-rl/data``."""
    eval_fraction: float = 0.1
    """Fraction of each file's episodes held out for ``metrics.json`` (at least one episode)."""
    preload: bool = True
    """Keep decoded episodes in memory (uint8) after their first use."""


@dataclass
class OptimConfig:
    """RAdam + Lookahead, as the reference implementation."""

    name: str = "radam"
    """``radam`` (the reference) or ``adamw``. RAdam's rectification damps its first few hundred
    steps (its factor is ~0.2 at step 100), which matters for short, time-budgeted runs."""
    lr: float = 1e-4
    weight_decay: float = 1e-3
    lookahead_alpha: float = 0.5
    """Lookahead interpolation factor (0 disables Lookahead)."""
    lookahead_k: int = 6
    """Fast steps between Lookahead synchronisations."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up at the start of every stage."""
    schedule: str = "constant"
    """``constant`` or ``cosine`` (decays to 10% of ``lr`` over the stage)."""


@dataclass
class StageBudget:
    """Fields every stage shares."""

    max_minutes: float = 0.0
    """Wall-clock budget of each of this stage's phases in minutes (0: none). A phase that runs out
    of time ends early, checkpointed, as if its steps were done: for runs that must fit a fixed
    time slot (a lent GPU, a CI job), or that get the same training time as another model. The
    budget is of training time summed over ``--resume``s (the checkpoint carries the phase's
    seconds so far), so an interrupted run trains as long as an uninterrupted one."""


@dataclass
class BackgroundStageConfig(StageBudget):
    """Section 3.4: uncertainty U-Net (supervised by foreground masks), then the MAE extractor."""

    uncertainty_steps: int = 2000
    extractor_steps: int = 2000
    batch_size: int = 16
    foreground_pos_weight: float = 0.0
    """Weight of foreground pixels in the uncertainty BCE; 0 = automatic (the batch's background /
    foreground pixel ratio, clamped to [1, 100]: objects cover a few % of the image)."""
    teacher_forcing: bool = False
    """Mask the extractor with the target foreground instead of the trained uncertainty net."""
    median_threshold: float = 0.1
    """Foreground threshold of the temporal-median target (videos without segmentation)."""
    lr_scale: float = 1.0
    """Learning rate of this stage = ``optim.lr * lr_scale``."""


@dataclass
class ObjectsStageConfig(StageBudget):
    """Section 3.5: single-object encoder/decoder pretraining with perturbed Gaussian positions."""

    steps: int = 4000
    batch_size: int = 16
    position_noise: float = 0.5
    """Std of the position perturbation, in units of the object's own size (kept inside the mask)."""
    size_noise: float = 0.2
    """Relative log-normal perturbation of the Gaussian's size."""
    min_pixels: int = 4
    """Objects with fewer visible pixels are not used as targets."""
    balanced_mask_loss: bool = True
    """Mask BCE as the mean of the object-pixel and the other-pixel averages (else all pixels
    averaged, which a decoder minimises by predicting empty masks for small objects)."""
    mask_weight: float = 1.0
    rgb_weight: float = 1.0
    depth_weight: float = 1.0
    position_weight: float = 0.0
    """Weight of a regression of the encoder's ``(x, y, size)`` to the object's mask centroid and
    std (0: the position is learnt only through the mask loss, as in the paper)."""
    teacher_position: bool = False
    """Decode from the object's true ``(x, y, size)`` (with the encoder's priority) instead of the
    encoder's estimate, so the decoder learns masks while localisation is still poor; use with
    ``position_weight`` > 0, which then teaches the encoder where objects are."""
    context_steps: int = 0
    """Steps of the ``objects/context`` phase that follows (0: no such phase). It trains the
    encoder and decoder on up to ``num_slots`` objects of an image at once, through the same
    warm-up passes ``LociS.warmup`` makes at inference: the first pass sees no slot context, each
    later one the masks, RGB and depth the previous pass decoded (and, for half the images, the
    ground-truth object masks where ``seg`` puts its proposals). Every pass's visible masks are
    supervised by the ground-truth instances. Single-object pretraining never shows the encoder
    the context channels ``LociS.step`` fills, and slots then slide onto the same object. Not in
    the paper, which relies on the (long) full stage for this."""
    context_batch_size: int = 4
    """Images per step of the context phase (each brings up to ``num_slots`` slots)."""
    context_passes: int = 3
    """Encoder-decoder passes per image in the context phase (``assignment.warmup_train``-like)."""
    context_max_minutes: float = 0.0
    """Wall-clock budget of the context phase in minutes (0: none)."""
    lr_scale: float = 1.0
    """Learning rate of this stage = ``optim.lr * lr_scale``."""


@dataclass
class ProposalStageConfig(StageBudget):
    """Section 3.6: YOLACT-like proposal network (skipped for videos without segmentation)."""

    steps: int = 2000
    batch_size: int = 16
    lr_scale: float = 1.0
    """Learning rate of this stage = ``optim.lr * lr_scale``."""


@dataclass
class FullStageConfig(StageBudget):
    """Section 4: full Loci-s video training with truncated BPTT."""

    steps: int = 10000
    """Training sequences; each gives ``ceil(seq_len / bptt)`` optimiser updates (one per window)."""
    batch_size: int = 8
    seq_len: int = 24
    """Frames per training sequence (clipped to the episode length)."""
    bptt: int = 2
    """Truncated BPTT window: frames per backward pass."""
    first_frame_fraction: float = 0.0
    """Fraction of the training sequences that start at their episode's first frame (the others
    start uniformly at random). Recorded scenes often move most at the start (objects dropped into
    place), where a uniform start under-samples them."""
    lr_scale: float = 1.0
    """Learning rate of this stage = ``optim.lr * lr_scale``."""
    long_steps: int = 0
    """Sequences of a ``full/long`` phase after ``full`` (0: no such phase): the same training
    (batch, sequence length, BPTT, ``lr_scale``) with a fresh optimiser, warm-up and schedule. A
    short ``full`` phase that fits a time slot, then a long one, is how the shipped checkpoint was
    trained; ``long_schedule_steps`` lets the long phase end while its learning rate is still high."""
    long_schedule_steps: int = 0
    """Length of the ``full/long`` phase's learning-rate schedule (0: ``long_steps``). Larger than
    ``long_steps``: the phase stops part way along the cosine, as a longer run cut off would."""
    long_max_minutes: float = 0.0
    """Wall-clock budget of the ``full/long`` phase in minutes (0: none)."""


@dataclass
class SAViStageConfig(StageBudget):
    """The SAVi baseline's only stage (``model_family: savi``, :mod:`locis_rl.savi.train`): video
    training with truncated BPTT, like ``full``. Conditional models get first-frame boxes / centres
    of the ground-truth segmentation."""

    steps: int = 10000
    """Training sequences; each gives ``ceil(seq_len / bptt)`` optimiser updates (one per window)."""
    batch_size: int = 8
    seq_len: int = 24
    """Frames per training sequence (clipped to the episode length)."""
    bptt: int = 2
    """Truncated BPTT window: frames per backward pass."""
    depth_weight: float = 1.0
    """Weight of the depth reconstruction term (``model.predict_depth`` and depth in the data)."""
    lr_scale: float = 1.0
    """Learning rate of this stage = ``optim.lr * lr_scale``."""


@dataclass
class StagesConfig:
    background: BackgroundStageConfig = field(default_factory=BackgroundStageConfig)
    objects: ObjectsStageConfig = field(default_factory=ObjectsStageConfig)
    proposal: ProposalStageConfig = field(default_factory=ProposalStageConfig)
    full: FullStageConfig = field(default_factory=FullStageConfig)
    savi: SAViStageConfig = field(default_factory=SAViStageConfig)


@dataclass
class EvalConfig:
    """``metrics.json`` at the end of a run (held-out split, :func:`locis_rl.evaluate.evaluate_model`)."""

    modes: tuple[str, ...] = ("rnd", "reg", "seg")
    max_sequences: int = 8
    enabled: bool = True


@dataclass
class TrainConfig:
    """Everything one ``python -m locis_rl.pretrain`` run needs (saved in every checkpoint)."""

    preset: str = "custom"
    """Name of the training preset (used in the default run directory)."""
    seed: int = 0
    model_family: str = "locis"
    """``locis`` or ``savi``: which model ``model`` configures (a :class:`LociSConfig` or a
    :class:`~locis_rl.savi.SAViConfig`) and which stages run (``savi``: the one ``savi`` stage)."""
    model_preset: str = "tiny"
    """Model preset the ``model`` section starts from (``savi``: a SAVi preset, ``tiny`` = ``savi-tiny``)."""
    model: LociSConfig = field(default_factory=LociSConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    """``auto`` (CUDA if available, with torchrun the local rank's GPU), ``cpu`` or ``cuda``."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    num_threads: int = 0
    """``torch.set_num_threads`` per process (0 = leave torch's default)."""
    checkpoint_every: int = 200
    """Optimiser steps between checkpoints (also written at every stage end)."""
    log_every: int = 10
    """Steps between TensorBoard scalars."""
    image_every: int = 500
    """Steps between PNG slot decompositions in ``run_dir/images`` (0 = only at stage ends)."""
    progress: bool = True
    """tqdm progress bars (rank 0)."""
    checkpoint_minutes: float = 0.0
    """Also checkpoint when this many minutes have passed since the last checkpoint (0: only every
    ``checkpoint_every`` steps): for phases whose steps take seconds, so an interruption never
    costs more than this much work."""
    stop_after_steps: int = 0
    """Exit (without a checkpoint) after this many optimiser steps of this invocation, as if the
    process were killed; 0 = never. For tests and time-boxed jobs; ``--resume`` continues."""

    def to_dict(self) -> dict[str, Any]:
        out = _plain(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild a saved config (model section complete, no preset lookup)."""
        data = dict(data)
        model = _model_config_class(str(data.get("model_family", "locis"))).from_dict(data.pop("model", {}) or {})
        cfg = apply_overrides(cls(model=model), data)
        return cfg.validate()

    def validate(self) -> "TrainConfig":
        if not isinstance(self.model, _model_config_class(self.model_family)):
            raise ConfigError(f"model_family={self.model_family!r} needs a "
                              f"{_model_config_class(self.model_family).__name__} model section, actual: "
                              f"{type(self.model).__name__}")
        self.model.validate()
        s = self.stages.savi
        if s.steps < 0 or s.bptt < 1 or s.seq_len < 1 or s.batch_size < 1:
            raise ConfigError("stages.savi: steps must be >= 0, bptt, seq_len and batch_size >= 1")
        for name in ("steps",):
            for stage in ("objects", "proposal", "full"):
                if getattr(getattr(self.stages, stage), name) < 0:
                    raise ConfigError(f"stages.{stage}.{name} must be >= 0")
        if self.stages.background.uncertainty_steps < 0 or self.stages.background.extractor_steps < 0:
            raise ConfigError("stages.background.*_steps must be >= 0")
        if self.stages.objects.context_steps < 0 or self.stages.objects.context_batch_size < 1 \
                or self.stages.objects.context_passes < 1:
            raise ConfigError("stages.objects: context_steps must be >= 0, context_batch_size and "
                              "context_passes >= 1")
        full = self.stages.full
        if not 0.0 <= full.first_frame_fraction <= 1.0:
            raise ConfigError(f"stages.full.first_frame_fraction must be in [0, 1], actual value: "
                              f"{full.first_frame_fraction}")
        if full.long_steps < 0 or full.long_schedule_steps < 0:
            raise ConfigError("stages.full.long_steps and long_schedule_steps must be >= 0")
        if 0 < full.long_schedule_steps < full.long_steps:
            raise ConfigError(f"stages.full.long_schedule_steps ({full.long_schedule_steps}) must be 0 or >= "
                              f"long_steps ({full.long_steps}): the schedule spans the whole phase")
        if self.checkpoint_minutes < 0:
            raise ConfigError(f"checkpoint_minutes must be >= 0, actual value: {self.checkpoint_minutes}")
        if self.stages.full.bptt < 1:
            raise ConfigError(f"stages.full.bptt must be >= 1, actual value: {self.stages.full.bptt}")
        if self.stages.full.seq_len < 2:
            raise ConfigError(f"stages.full.seq_len must be >= 2, actual value: {self.stages.full.seq_len}")
        if self.optim.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule: expected 'constant' or 'cosine', actual value: {self.optim.schedule!r}")
        if not 0.0 <= self.optim.lookahead_alpha <= 1.0 or self.optim.lookahead_k < 1:
            raise ConfigError("optim.lookahead_alpha must be in [0, 1] and optim.lookahead_k >= 1")
        for mode in self.eval.modes:
            if mode not in ("rnd", "reg", "seg"):
                raise ConfigError(f"eval.modes: unknown mode {mode!r}; expected rnd, reg or seg")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device: expected auto, cpu or cuda[:N], actual value: {self.device!r}")
        for k in ("checkpoint_every", "log_every", "image_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0")
        return self


def _model_config_class(family: str) -> type:
    """The model config class of a ``model_family`` (raises :class:`ConfigError` for others)."""
    if family == "locis":
        return LociSConfig
    if family == "savi":
        from locis_rl.savi.config import SAViConfig

        return SAViConfig
    raise ConfigError(f"model_family: expected one of {list(MODEL_FAMILIES)}, actual value: {family!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def train_config_dirs() -> list[Path]:
    return [root / "train" for root in config_search_dirs()]


def _find_train_preset(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if path.exists():
            return path
        raise ConfigError(f"training config file {name!r} does not exist")
    found: set[str] = set()
    for d in train_config_dirs():
        candidate = d / f"{name}.yaml"
        if candidate.exists():
            return candidate
        found.update(p.stem for p in d.glob("*.yaml"))
    raise ConfigError(f"unknown training preset {name!r}; available: {sorted(found)} (or pass a .yaml path)")


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stages.full.steps=200)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out[key.strip()] = value if parsed is None else parsed
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _coerce_strings(cfg_obj: Any, flat: dict[str, Any]) -> dict[str, Any]:
    """YAML turns ``level=a`` into the string ``'a'`` and ``paths=x.h5`` into a string; lists
    and strings are what the dataclasses expect, but a scalar for a tuple field is wrapped."""
    out = {}
    for key, value in flat.items():
        obj = cfg_obj
        parts = key.split(".")
        for p in parts[:-1]:
            obj = getattr(obj, p, None)
        current = getattr(obj, parts[-1], None) if obj is not None else None
        if isinstance(current, tuple) and not isinstance(value, (list, tuple)):
            value = [value] if not (isinstance(value, str) and value.startswith("[")) else value
        if isinstance(current, str) and not isinstance(value, str) and value is not None:
            value = str(value)
        if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
            # YAML 1.1 reads "1e-3" as a string; accept every float literal Python accepts
            try:
                number = float(value)
                value = int(number) if isinstance(current, int) and number.is_integer() else number
            except ValueError:
                pass  # apply_overrides reports the bad value
        out[key] = value
    return out


def load_train_config(preset: str = "quickstart", overrides: dict[str, Any] | Sequence[str] | None = None) -> TrainConfig:
    """Load a training preset (name in ``configs/train/`` or a YAML path) and apply overrides.

    Raises:
        ConfigError: unknown preset, unknown key or badly typed value.
    """
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    path = _find_train_preset(preset)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    flat = _flatten(data)
    flat.update(overrides)
    flat.setdefault("preset", Path(path).stem)
    family = str(flat.pop("model_family", TrainConfig.model_family))
    model_preset = str(flat.pop("model_preset", TrainConfig.model_preset))
    base = TrainConfig(model=_model_config_class(family).preset(model_preset), model_preset=model_preset,
                       model_family=family)
    flat = _coerce_strings(base, flat)
    cfg = apply_overrides(base, flat)
    return cfg.validate()


def apply_train_overrides(cfg: TrainConfig, overrides: dict[str, Any] | Sequence[str] | None) -> TrainConfig:
    """Overrides on an existing config (e.g. a resumed run's saved config)."""
    if not overrides:
        return cfg
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    if ("model_preset" in overrides or "model_family" in overrides
            or any(k.startswith("model.") for k in overrides)):
        raise ConfigError("the model of a resumed run cannot be changed (model / model_preset / model_family "
                          "overrides)")
    return apply_overrides(cfg, _coerce_strings(cfg, dict(overrides))).validate()
