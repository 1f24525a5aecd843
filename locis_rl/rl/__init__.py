"""RL adapters for Loci-s perception: slot features instead of pixels.

- :class:`LociSWrapper`, :class:`LociSVectorWrapper` (Gymnasium) - ``locis_rl.rl.gymnasium_wrappers``
- :class:`LociSVecEnvWrapper`, :class:`ControlledSlotVecEnv`, :class:`SlotSetExtractor` (Stable-Baselines3)
  - ``locis_rl.rl.sb3``
- :class:`LociSTransform`, ``make_slot_actor`` / ``make_slot_value`` (TorchRL) - ``locis_rl.rl.torchrl``
- :class:`SlotPerception`, the per-env slot-state core they share - ``locis_rl.rl.perception``

The SB3 and TorchRL parts load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .gymnasium_wrappers import LociSVectorWrapper, LociSWrapper
from .perception import SlotPerception
from .slot_set import SlotSetEncoder

__all__ = ["LociSWrapper", "LociSVectorWrapper", "LociSVecEnvWrapper", "ControlledSlotVecEnv", "SlotSetExtractor",
           "LociSTransform", "SlotPerception", "SlotSetEncoder"]

_LAZY = {
    "LociSVecEnvWrapper": "locis_rl.rl.sb3",
    "SlotSetExtractor": "locis_rl.rl.sb3",
    "ControlledSlotVecEnv": "locis_rl.rl.sb3",
    "LociSTransform": "locis_rl.rl.torchrl",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'locis_rl.rl' has no attribute {name!r}")
