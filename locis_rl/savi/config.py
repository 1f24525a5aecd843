"""Typed configuration of the SAVi baseline (Kipf et al., ICLR 2022, "Conditional Object-Centric
Learning from Video"; sizes from its appendix A.6, tables A.5 / A.6).

Every default equals the paper's 64x64 MOVi model (11 slots of 128, one Slot Attention iteration
per frame, a one-block Transformer predictor with 4 heads and MLP 256, an 8x8 spatial-broadcast
decoder), with one documented addition: ``corrector.first_frame_iterations`` (see
:class:`SAViCorrectorConfig`). Presets are YAML files of overrides in ``configs/model/savi-*.yaml``
(``SAViConfig.preset("tiny")`` loads ``savi-tiny.yaml``); the override / type-check machinery is the
one of :mod:`locis_rl.model.config`.

Example:
    >>> cfg = SAViConfig.preset("tiny")
    >>> cfg.num_slots, cfg.slot_dim, cfg.feature_size
    (6, 64, 32)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from locis_rl.model.config import ConfigError, PresetConfig, config_search_dirs

__all__ = [
    "CONDITIONING_MODES",
    "SAViEncoderConfig",
    "SAViCorrectorConfig",
    "SAViPredictorConfig",
    "SAViDecoderConfig",
    "SAViInitializerConfig",
    "SAViConfig",
]

Conditioning = Literal["unconditional-learned", "unconditional-sampled", "boxes", "centers"]
CONDITIONING_MODES = ("unconditional-learned", "unconditional-sampled", "boxes", "centers")
"""``unconditional-learned``: one learned initial vector per slot; ``unconditional-sampled``: every
slot drawn from one learned Gaussian (per row, per episode); ``boxes`` / ``centers``: first-frame
bounding boxes ``(y0, x0, y1, x1)`` / centres of mass ``(y, x)`` through an MLP."""


@dataclass
class SAViEncoderConfig:
    """CNN encoder (table A.5): convs -> + position embedding -> LayerNorm -> per-position MLP."""

    channels: tuple[int, ...] = (32, 32, 32, 32)
    """Output channels of each conv (ReLU after all but the last)."""
    strides: tuple[int, ...] = (1, 1, 1, 1)
    """Stride of each conv (the paper: 1 at 64x64, a first stride 2 at 128x128)."""
    kernel_size: int = 5
    mlp_hidden: int = 64
    """Hidden width of the per-position MLP (1x1 convs of table A.5)."""
    feature_dim: int = 64
    """Width of the encoder features ``D_enc`` that Slot Attention attends over."""


@dataclass
class SAViCorrectorConfig:
    """Slot Attention corrector (section 2, eq. 1) with a GRU update."""

    iterations: int = 1
    """Slot Attention iterations on every frame after a row's first (the paper: 1 on MOVi)."""
    first_frame_iterations: int = 3
    """Iterations on a row's first frame. Not in SAVi (which always runs ``iterations``): the
    first frame starts from the initializer, not from a predictor output, so it gets the image
    Slot Attention default of 3 to settle the decomposition. Set to ``iterations`` for the paper."""
    residual_mlp: bool = False
    """Residual MLP ``s + MLP(LN(s))`` after each GRU update (the paper uses it only with more
    than one iteration per frame; off in its MOVi setting)."""
    mlp_hidden: int = 256
    epsilon: float = 1e-8
    """Added to the attention before the weighted mean over inputs (empty slots stay finite)."""


@dataclass
class SAViPredictorConfig:
    """Transformer-encoder predictor (section 2, eq. 2): post-LayerNorm self-attention + MLP."""

    kind: Literal["transformer", "identity"] = "transformer"
    """``identity`` is the paper's CATER setting (no dynamics)."""
    layers: int = 1
    heads: int = 4
    mlp_hidden: int = 256


@dataclass
class SAViDecoderConfig:
    """Slot-wise spatial-broadcast decoder (table A.6)."""

    broadcast_size: int = 8
    """Side of the grid each slot vector is broadcast to (+ position embedding)."""
    channels: tuple[int, ...] = (64, 64, 64, 64)
    """Output channels of each transposed conv (ReLU after all but the last)."""
    strides: tuple[int, ...] = (2, 2, 2, 1)
    """Their strides; ``broadcast_size * prod(strides)`` must equal ``image_size``."""
    kernel_size: int = 5


@dataclass
class SAViInitializerConfig:
    """Initial slots (section 2, "Slot Initialization"; appendix A.6 "Initializer")."""

    hidden: int = 256
    """Hidden width of the box / centre MLP (one hidden layer, ReLU)."""
    initial_sigma: float = 1.0
    """``unconditional-sampled``: initial std of the learned Gaussian."""


@dataclass
class SAViConfig(PresetConfig):
    """Whole-model configuration of the SAVi baseline."""

    image_size: int = 64
    num_slots: int = 11
    slot_dim: int = 128
    """``D``: slot size = query / key / value size of Slot Attention and of the predictor."""
    use_depth: bool = False
    """Feed scene-relative depth (``locis_rl.model.depth_input``) as a 4th encoder channel."""
    predict_depth: bool = False
    """SAVi++-style: the decoder also predicts per-slot (scene-relative) depth."""
    conditioning: Conditioning = "unconditional-learned"
    presence_threshold: float = 0.002
    """A slot is present when its decoded mask mass exceeds this fraction of the image (~8 px at 64x64)."""
    position_source: Literal["mask", "attention"] = "mask"
    """Where ``position`` (x, y, std) is read from: the decoded alpha mask (full resolution) or the
    corrector's last attention map (feature resolution)."""
    encoder: SAViEncoderConfig = field(default_factory=SAViEncoderConfig)
    corrector: SAViCorrectorConfig = field(default_factory=SAViCorrectorConfig)
    predictor: SAViPredictorConfig = field(default_factory=SAViPredictorConfig)
    decoder: SAViDecoderConfig = field(default_factory=SAViDecoderConfig)
    initializer: SAViInitializerConfig = field(default_factory=SAViInitializerConfig)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def gestalt_dim(self) -> int:
        """Length of the per-slot code downstream consumers read as ``gestalt`` (the slot vector)."""
        return self.slot_dim

    @property
    def image_channels(self) -> int:
        """Encoder input channels: RGB, plus scene-relative depth with ``use_depth``."""
        return 4 if self.use_depth else 3

    @property
    def feature_size(self) -> int:
        """Side ``H'`` of the encoder feature grid (and of ``out["attention"]``)."""
        down = 1
        for s in self.encoder.strides:
            down *= s
        return self.image_size // down

    @property
    def conditional(self) -> bool:
        """Whether the first frame of a row needs conditioning input (boxes / centres)."""
        return self.conditioning in ("boxes", "centers")

    # ---- validation / (de)serialisation --------------------------------------------------
    def validate(self) -> "SAViConfig":
        if self.conditioning not in CONDITIONING_MODES:
            raise ConfigError(f"conditioning: expected one of {CONDITIONING_MODES}, actual value: "
                              f"{self.conditioning!r}")
        if self.position_source not in ("mask", "attention"):
            raise ConfigError(f"position_source: expected 'mask' or 'attention', actual value: "
                              f"{self.position_source!r}")
        if self.predictor.kind not in ("transformer", "identity"):
            raise ConfigError(f"predictor.kind: expected 'transformer' or 'identity', actual value: "
                              f"{self.predictor.kind!r}")
        if self.num_slots < 1 or self.slot_dim < 1:
            raise ConfigError(f"num_slots and slot_dim must be >= 1, actual values: "
                              f"{self.num_slots}, {self.slot_dim}")
        enc, dec = self.encoder, self.decoder
        if len(enc.channels) != len(enc.strides) or not enc.channels:
            raise ConfigError(f"encoder.channels and encoder.strides need the same (non-zero) length, "
                              f"actual: {list(enc.channels)}, {list(enc.strides)}")
        if len(dec.channels) != len(dec.strides) or not dec.channels:
            raise ConfigError(f"decoder.channels and decoder.strides need the same (non-zero) length, "
                              f"actual: {list(dec.channels)}, {list(dec.strides)}")
        if enc.kernel_size % 2 == 0 or dec.kernel_size % 2 == 0:
            raise ConfigError("encoder.kernel_size and decoder.kernel_size must be odd")
        down = 1
        for s in enc.strides:
            down *= s
        if self.image_size % down:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by the product of "
                              f"encoder.strides ({down})")
        up = dec.broadcast_size
        for s in dec.strides:
            up *= s
        if up != self.image_size:
            raise ConfigError(f"decoder.broadcast_size x prod(decoder.strides) must equal image_size "
                              f"({self.image_size}), actual value: {up}")
        if self.predictor.kind == "transformer" and self.slot_dim % self.predictor.heads:
            raise ConfigError(f"slot_dim ({self.slot_dim}) must be divisible by predictor.heads "
                              f"({self.predictor.heads})")
        if self.corrector.iterations < 1 or self.corrector.first_frame_iterations < 1:
            raise ConfigError("corrector.iterations and corrector.first_frame_iterations must be >= 1")
        return self

    @staticmethod
    def find_preset(name: str) -> Path:
        """``configs/model/savi-<name>.yaml`` (``"tiny"``, ``"small"``) or the full stem."""
        return _find_savi_preset(name)


def _find_savi_preset(name: str) -> Path:
    stems = [name] if name.startswith("savi-") else [f"savi-{name}", name]
    found: list[str] = []
    for root in config_search_dirs():
        for stem in stems:
            candidate = root / "model" / f"{stem}.yaml"
            if candidate.exists() and candidate.stem.startswith("savi-"):
                return candidate
        found += sorted(p.stem for p in (root / "model").glob("savi-*.yaml"))
    raise ConfigError(f"unknown SAVi preset {name!r}; available: {sorted(set(found))} "
                      f"(or pass a path to a .yaml file)")
