"""Loci-s model components and the assembled :class:`LociS` (see ``docs/architecture.md``).

Example:
    >>> from locis_rl.model import LociS, LociSConfig
    >>> model = LociS(LociSConfig.preset("tiny"))
"""
from __future__ import annotations

from locis_rl.model.background import BackgroundExtractor, BackgroundModule, UncertaintyNet
from locis_rl.model.config import (
    INFERENCE_OVERRIDE_KEYS,
    AssignmentConfig,
    BackgroundConfig,
    ConfigError,
    DecoderConfig,
    EncoderConfig,
    LociSConfig,
    PerceptGateConfig,
    ProposalConfig,
    TransitionConfig,
)
from locis_rl.model.decoder import CascadedDecoder, compose
from locis_rl.model.depth_input import scene_relative_depth
from locis_rl.model.encoder import HyperConvNeXtEncoder
from locis_rl.model.locis import FORMAT_VERSION, CheckpointError, LociS
from locis_rl.model.percept_gate import PerceptGate
from locis_rl.model.proposals import ProposalNet, proposal_loss
from locis_rl.model.transition import GateL0RDCell, SlotTransition

__all__ = [
    "LociS",
    "LociSConfig",
    "CheckpointError",
    "FORMAT_VERSION",
    "ConfigError",
    "INFERENCE_OVERRIDE_KEYS",
    "EncoderConfig",
    "DecoderConfig",
    "PerceptGateConfig",
    "TransitionConfig",
    "BackgroundConfig",
    "ProposalConfig",
    "AssignmentConfig",
    "BackgroundModule",
    "BackgroundExtractor",
    "UncertaintyNet",
    "ProposalNet",
    "proposal_loss",
    "HyperConvNeXtEncoder",
    "PerceptGate",
    "SlotTransition",
    "GateL0RDCell",
    "CascadedDecoder",
    "compose",
    "scene_relative_depth",
]
