"""Video data: record HDF5 videos from Gymnasium / MuJoCo / dm_control envs and read them back.

* ``python -m locis_rl.data.generate ...`` (:func:`locis_rl.data.generate.generate` in Python)
  writes the files; the HDF5 layout is documented in that module.
* :class:`VideoDataset` reads windows of frames as torch tensors; :func:`describe` returns a
  file's attributes; :class:`DatasetError` is raised for missing, truncated or foreign files.

Names load lazily: recording workers (spawned processes) then never import torch, and
``python -m locis_rl.data.generate`` does not import its own module twice.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

_LAZY = {
    "DatasetError": "locis_rl.data.dataset",
    "VideoDataset": "locis_rl.data.dataset",
    "describe": "locis_rl.data.dataset",
    "FORMAT": "locis_rl.data.generate",
    "FORMAT_VERSION": "locis_rl.data.generate",
    "parse_kwargs": "locis_rl.data.generate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'locis_rl.data' has no attribute {name!r}")
