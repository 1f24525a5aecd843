"""SAVi (Slot Attention for Video, Kipf et al. 2022) baseline with the explicit-state API of LociS.

    >>> from locis_rl.savi import SAVi, SAViConfig, boxes_from_segmentation
    >>> model = SAVi("tiny")                      # configs/model/savi-tiny.yaml
    >>> state = model.init_state(4, seed=0)       # TensorDict [4]: slots, initialized, frame_index, rng_seed
"""
from __future__ import annotations

from locis_rl.savi.config import CONDITIONING_MODES, SAViConfig
from locis_rl.savi.model import SAVi, boxes_from_segmentation
from locis_rl.model.locis import CheckpointError

__all__ = ["SAVi", "SAViConfig", "CONDITIONING_MODES", "boxes_from_segmentation", "CheckpointError"]
