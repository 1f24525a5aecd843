"""Typed configuration of every Loci-s component.

Every default lives here, once, and equals the paper's sizes (appendix C, tables 4-8) or the
reference implementation's defaults (``shared/REFERENCE.md``). Presets (``tiny``, ``small``,
``paper``) are YAML files of overrides in ``configs/model/``; ``LociSConfig.preset(name)`` loads
them, ``LociSConfig.from_dict`` / ``to_dict`` round-trip through checkpoints.

Example:
    >>> cfg = LociSConfig.preset("tiny")
    >>> cfg.num_slots, cfg.image_size, cfg.gestalt_dim
    (6, 64, 96)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "EncoderConfig",
    "DecoderConfig",
    "PerceptGateConfig",
    "TransitionConfig",
    "BackgroundConfig",
    "ProposalConfig",
    "AssignmentConfig",
    "LociSConfig",
    "ConfigError",
    "PresetConfig",
    "config_search_dirs",
    "apply_overrides",
    "INFERENCE_OVERRIDE_KEYS",
    "inference_overrides",
    "apply_inference_overrides",
]

AssignmentMode = Literal["rnd", "reg", "seg"]

INFERENCE_OVERRIDE_KEYS: tuple[str, ...] = (
    "num_slots",
    "assignment.mode",
    "assignment.warmup_train",
    "assignment.warmup_inference",
    "assignment.initial_size",
    "assignment.reg_distance",
    "assignment.reg_correlation",
    "assignment.reg_drop_probability",
    "assignment.new_object_fraction",
    "assignment.presence_threshold",
    "proposals.score_threshold",
    "proposals.min_instance_pixels",
)
"""The config fields a loaded checkpoint may change (``LociS.from_pretrained(path, overrides=...)``).

None of them sizes a parameter: every slot module (encoder, percept gate, transition with slot
self-attention, decoder) is shared across slots, so ``num_slots`` only sets ``K`` of the state and
outputs; the ``assignment.*`` fields and the proposal thresholds are read at run time. Not here, as
they change parameter shapes: ``image_size`` (the background ViT's positional embeddings),
``use_depth`` (input channels), ``gestalt_size`` and every other width or depth, and
``proposals.max_instances`` (it sizes the proposal hypernetwork's output layer). Shape-free fields
that only matter in training (noise, loss weights) or that the weights were trained for
(``decoder.occlusion_temperature``) are left out on purpose. ``tests/test_model_locis.py`` loads a
checkpoint strictly with each of these keys overridden.
"""


class ConfigError(ValueError):
    """A config key that does not exist, a value of the wrong type, or an unknown preset."""


@dataclass
class EncoderConfig:
    """Slot-wise Hyper-ConvNeXt encoder (table 4)."""

    stage_channels: tuple[int, ...] = (32, 64, 128)
    """Channels after each residual patch embedding of the encoder base."""
    stage_strides: tuple[int, ...] = (4, 2, 2)
    """Strides of those embeddings (product = down-sampling of the base, 16 in the paper)."""
    stage_blocks: tuple[int, ...] = (1, 1, 2)
    """Hyper-ConvNeXt blocks after each embedding."""
    position_blocks: int = 3
    """Hyper-ConvNeXt blocks of the position head (the last maps to 4 channels)."""
    gestalt_base_blocks: int = 2
    """Shared Hyper-ConvNeXt blocks before the mask / depth / RGB Gestalt heads."""
    gestalt_channels: int = 256
    """Channels of each Gestalt head (after its stride-2 embedding)."""
    gestalt_blocks: int = 4
    """Hyper-ConvNeXt blocks per Gestalt head."""
    hyper_hidden: int = 128
    """Hidden width of the hypernetwork that maps the predicted Gestalt code to kernel residuals."""
    kernel_size: int = 7
    """Depth-wise kernel size of the (Hyper-)ConvNeXt blocks."""


@dataclass
class DecoderConfig:
    """Cascaded mask -> depth -> RGB decoder (table 6)."""

    patch_size: int = 16
    """Up-sampling factor of the final transposed convolutions (latent grid = image / patch)."""
    mask_channels: tuple[int, ...] = (128, 64, 32)
    """Conv widths of the mask decoder after the Gestalt-position fusion."""
    mask_latent: int = 128
    depth_channels: int = 64
    depth_blocks: int = 3
    rgb_channels: int = 128
    rgb_blocks: int = 5
    mask_embedding: int = 32
    """Channels of the encoded object mask fed to the depth and RGB decoders."""
    depth_embedding: int = 64
    """Channels of the encoded depth fed to the RGB decoder."""
    position_embedding: int = 16
    """Channels of the positional embedding concatenated in the depth / RGB decoders."""
    occlusion_temperature: float = 0.1
    """Softness of the priority ordering used for occlusion (smaller = harder)."""


@dataclass
class PerceptGateConfig:
    """Kalman-like percept gate (appendix A)."""

    hidden: int = 256
    layers: int = 3
    initial_bias: float = 3.0
    """Bias of the gate logits at initialisation: tanh(3) ~ 1, so gates start open."""
    noise_std: float = 0.1
    """Std of the gate noise epsilon added in training (eq. 3)."""
    l0_weight: float = 1e-5
    """Weight of the L0 penalty on gate openings."""


@dataclass
class TransitionConfig:
    """GateL0RD + slot self-attention predictor (table 5)."""

    hidden: int = 1024
    layers: int = 5
    """GateL0RD layers; a self-attention layer sits between consecutive ones (layers - 1 of them)."""
    heads: int = 1
    gate_noise_std: float = 0.1
    """Noise on the GateL0RD gate pre-activations in training (as in GateL0RD)."""
    l0_weight: float = 1e-5
    """Weight of the L0 penalty on GateL0RD hidden-state updates."""


@dataclass
class BackgroundConfig:
    """Background module (section 3.4, table 8)."""

    uncertainty_channels: tuple[int, ...] = (16, 32, 64, 128)
    uncertainty_strides: tuple[int, ...] = (4, 2, 2, 2)
    vit_dim: int = 64
    vit_heads: int = 4
    vit_patch: int = 16
    vit_base_layers: int = 1
    vit_rgb_layers: int = 2
    vit_depth_layers: int = 1
    depth_bottleneck: int = 16
    """Width of the narrow binarised bottleneck the background depth must pass through."""
    uncertainty_threshold: float = 0.1
    """Foreground probability above which a pixel counts as uncertain (masked out of the MAE)."""


@dataclass
class ProposalConfig:
    """YOLACT-like proposal network (section 3.6, table 7)."""

    base_channels: int = 64
    stage_blocks: tuple[int, ...] = (1, 2, 3, 1)
    num_prototypes: int = 32
    max_instances: int = 16
    hyper_hidden: int = 512
    min_instance_pixels: int = 8
    """Instances with fewer predicted pixels than this (at the input resolution) are dropped."""
    score_threshold: float = 0.5


@dataclass
class AssignmentConfig:
    """Initial slot assignment (section 3.6): ``rnd``, ``reg`` or ``seg``."""

    mode: AssignmentMode = "seg"
    warmup_train: int = 3
    """Warm-up (teacher-forcing) iterations on the first frame in training (section 4)."""
    warmup_inference: int = 10
    """Warm-up iterations on the first frame at inference."""
    initial_size: float = 0.1
    """Std of the Gaussian position given to a freshly assigned slot (normalised units)."""
    reg_distance: float = 0.15
    """``reg``: slots closer than this (normalised units) may be duplicates."""
    reg_correlation: float = 0.8
    """``reg``: and whose Gestalt codes correlate above this are duplicates."""
    reg_drop_probability: float = 0.5
    """``reg``: probability of nullifying one slot of a duplicate pair per warm-up iteration."""
    new_object_fraction: float = 0.002
    """Fraction of the image that unexplained foreground must cover before a free slot is assigned."""
    presence_threshold: float = 0.5
    """A slot whose visible mask stays below this total mass ratio is released (``presence`` 0)."""


class PresetConfig:
    """(De)serialisation shared by the model configs (dataclasses with a ``validate`` method).

    Subclasses name their preset files with ``find_preset(name) -> Path``.
    """

    def validate(self):  # pragma: no cover - every subclass defines its own checks
        return self

    @staticmethod
    def find_preset(name: str) -> Path:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a (possibly partial) nested dict; unknown keys raise :class:`ConfigError`."""
        return apply_overrides(cls(), data).validate()

    @classmethod
    def preset(cls, name: str):
        """Load a preset: a name of :meth:`find_preset` or a path to a ``.yaml`` file.

        Raises:
            ConfigError: the preset does not exist (the message lists those that do).
        """
        path = Path(name)
        if not (path.suffix in (".yaml", ".yml") and path.exists()):
            path = cls.find_preset(name)
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        data = data.get("model", data)
        return cls.from_dict(data)

    def replace(self, **changes: Any):
        """A copy with nested overrides, e.g. ``cfg.replace(use_depth=True, assignment={"mode": "rnd"})``."""
        return apply_overrides(self, changes).validate()


@dataclass
class LociSConfig(PresetConfig):
    """Whole-model configuration. Derived sizes are properties, never stored twice."""

    image_size: int = 256
    num_slots: int = 16
    gestalt_size: int = 256
    """Size of each Gestalt part; the code is mask | depth | RGB, 3 x gestalt_size in all."""
    use_depth: bool = False
    """Loci-s_d: scene-relative depth (appendix B) as an extra encoder / background input."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    percept_gate: PerceptGateConfig = field(default_factory=PerceptGateConfig)
    transition: TransitionConfig = field(default_factory=TransitionConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    assignment: AssignmentConfig = field(default_factory=AssignmentConfig)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def gestalt_dim(self) -> int:
        """Total Gestalt code length ``G = 3 * gestalt_size``."""
        return 3 * self.gestalt_size

    @property
    def position_dim(self) -> int:
        """Position code length: ``(x, y, size, priority)``."""
        return 4

    @property
    def image_channels(self) -> int:
        """Channels of the scene input: RGB, plus scene-relative depth with ``use_depth``."""
        return 4 if self.use_depth else 3

    @property
    def encoder_in_channels(self) -> int:
        """Per-slot encoder input channels (section 2 + figure 2).

        frame (3) | previous error (1) | background mask (1) | position Gaussian (1) |
        visible mask (1) | object mask (1) | slot RGB (3) | other slots' masks (1)
        and with depth: scene depth (1) | slot depth (1).
        """
        return 12 + (2 if self.use_depth else 0)

    # ---- validation / (de)serialisation --------------------------------------------------
    def validate(self) -> "LociSConfig":
        down = 1
        for s in self.encoder.stage_strides:
            down *= s
        if self.image_size % (down * 2) or self.image_size % self.decoder.patch_size:
            raise ConfigError(
                f"image_size must be divisible by the encoder down-sampling x2 ({down * 2}) and by "
                f"decoder.patch_size ({self.decoder.patch_size}), actual value: {self.image_size}")
        if self.image_size % self.background.vit_patch:
            raise ConfigError(f"image_size must be divisible by background.vit_patch "
                              f"({self.background.vit_patch}), actual value: {self.image_size}")
        if self.num_slots < 1:
            raise ConfigError(f"num_slots must be >= 1, actual value: {self.num_slots}")
        if self.assignment.mode not in ("rnd", "reg", "seg"):
            raise ConfigError(f"assignment.mode: expected 'rnd', 'reg' or 'seg', actual value: "
                              f"{self.assignment.mode!r}")
        if self.transition.hidden % self.transition.heads:
            raise ConfigError("transition.hidden must be divisible by transition.heads")
        if self.background.vit_dim % self.background.vit_heads:
            raise ConfigError("background.vit_dim must be divisible by background.vit_heads")
        return self

    @staticmethod
    def find_preset(name: str) -> Path:
        """``configs/model/<name>.yaml`` (``tiny``, ``small``, ``paper``)."""
        return _find_preset(name)


def config_search_dirs() -> list[Path]:
    """Where presets are looked up: the repository's ``configs/`` (editable installs) first."""
    package_dir = Path(__file__).resolve().parent.parent
    return [package_dir.parent / "configs", package_dir / "configs"]


def _find_preset(name: str) -> Path:
    found: list[str] = []
    for root in config_search_dirs():
        candidate = root / "model" / f"{name}.yaml"
        if candidate.exists():
            return candidate
        found += sorted(p.stem for p in (root / "model").glob("*.yaml"))
    raise ConfigError(f"unknown model preset {name!r}; available: {sorted(set(found))} "
                      f"(or pass a path to a .yaml file)")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def apply_overrides(obj: Any, changes: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with nested ``changes`` applied and types checked.

    Dotted keys (``"assignment.mode"``) are accepted, as from a CLI ``key=value`` list.
    """
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})
            if not isinstance(nested[head], dict):
                raise ConfigError(f"{prefix}{head} is set both as a value and as a section")
            nested[head][rest] = value
        else:
            if isinstance(value, dict) and isinstance(nested.get(head), dict):
                nested[head].update(value)
            else:
                nested[head] = value
    fields = {f.name: f for f in dataclasses.fields(obj)}
    updates: dict[str, Any] = {}
    for key, value in nested.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key!r}; valid keys here: {sorted(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} is a section; expected a mapping, actual value: {value!r}")
            updates[key] = apply_overrides(current, value, prefix=f"{prefix}{key}.")
        else:
            updates[key] = _coerce(value, current, f"{prefix}{key}")
    return dataclasses.replace(obj, **updates)


def _coerce(value: Any, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected a bool, actual value: {value!r}")
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, actual value: {value!r}")
        return tuple(value)
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:  # pragma: no cover - yaml accepts nearly anything
                raise ConfigError(f"{name}: expected a number, actual value: {value!r}") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, actual value: {value!r}")
        if isinstance(current, int) and not float(value).is_integer():
            raise ConfigError(f"{name}: expected an integer, actual value: {value!r}")
        return type(current)(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, actual value: {value!r}")
    return value


def _flatten_keys(changes: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections to dotted keys: ``{"assignment": {"mode": "reg"}}`` -> ``{"assignment.mode": ...}``."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if isinstance(value, Mapping):
            out.update(_flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_config_key(key: str) -> bool:
    obj: Any = LociSConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return not dataclasses.is_dataclass(obj)


def inference_overrides(overrides: Mapping[str, Any] | None = None, *,
                        num_slots: int | None = None) -> dict[str, Any]:
    """Check inference-time overrides of a loaded checkpoint's config; return them as dotted keys.

    Args:
        overrides: dotted (``{"assignment.mode": "reg"}``) or nested (``{"assignment": {"mode":
            "reg"}}``) keys; every key must be in :data:`INFERENCE_OVERRIDE_KEYS`.
        num_slots: shorthand for ``overrides["num_slots"]`` (``None``: not overridden).

    Returns:
        ``{dotted key: value}`` (empty when there is nothing to override). Values are checked when
        applied (:func:`apply_inference_overrides`).

    Raises:
        ConfigError: an unknown key, a key that may not change on a trained model (the message
            lists the allowed ones), or ``num_slots`` given twice with different values.
    """
    flat = _flatten_keys(dict(overrides or {}))
    if num_slots is not None:
        if "num_slots" in flat and flat["num_slots"] != num_slots:
            raise ConfigError(f"num_slots is given twice with different values: {num_slots!r} and "
                              f"overrides['num_slots'] = {flat['num_slots']!r}")
        flat["num_slots"] = num_slots
    for key in flat:
        if key in INFERENCE_OVERRIDE_KEYS:
            continue
        allowed = f"allowed inference-time keys: {list(INFERENCE_OVERRIDE_KEYS)}"
        if not _is_config_key(key):
            raise ConfigError(f"unknown config key {key!r} in the overrides of a loaded checkpoint; {allowed}")
        raise ConfigError(f"{key!r} cannot be overridden on a loaded checkpoint: it changes parameter "
                          f"shapes or what the weights were trained for; {allowed}")
    return flat


def apply_inference_overrides(config: LociSConfig, overrides: Mapping[str, Any] | None = None, *,
                              num_slots: int | None = None) -> LociSConfig:
    """``config`` with inference-time overrides applied (see :func:`inference_overrides`).

    Example:
        >>> cfg = apply_inference_overrides(LociSConfig.preset("tiny"), {"assignment.mode": "reg"},
        ...                                 num_slots=10)
        >>> cfg.num_slots, cfg.assignment.mode
        (10, 'reg')

    Raises:
        ConfigError: a disallowed key (see :func:`inference_overrides`) or a bad value
            (e.g. ``num_slots=0``).
    """
    flat = inference_overrides(overrides, num_slots=num_slots)
    return apply_overrides(config, flat).validate() if flat else config
