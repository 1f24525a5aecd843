"""Training checkpoints: one ``checkpoint.pt`` per run directory, written atomically.

Contents (``format="locis-rl-train-checkpoint"``, ``format_version=1``): the full
:class:`TrainConfig` (as a dict), the ``--stage`` value and the resolved phase list, the phase
index and the next step within it, the global step, model / optimizer (with Lookahead slow
weights) / scheduler states, RNG states (python, numpy, torch CPU and CUDA) and the data files.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locis_rl.model.checkpoint_io import atomic_torch_save

__all__ = ["TRAIN_FORMAT", "TRAIN_FORMAT_VERSION", "ResumeError", "save_train_checkpoint",
           "load_train_checkpoint", "rng_state", "set_rng_state"]

TRAIN_FORMAT = "locis-rl-train-checkpoint"
TRAIN_FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class ResumeError(ValueError):
    """A run directory or checkpoint that cannot be resumed (message says why)."""


def rng_state() -> dict[str, Any]:
    """RNG states as tensors / ints / tuples only, so ``torch.load(weights_only=True)`` reads them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu() if torch.is_tensor(state["torch"]) else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # different GPU count: the per-step seeding makes this harmless
            pass


def save_train_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (temporary file + fsync + ``os.replace``)."""
    return atomic_torch_save({"format": TRAIN_FORMAT, "format_version": TRAIN_FORMAT_VERSION, **payload}, path)


def load_train_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a training checkpoint (a file or a run directory).

    Raises:
        ResumeError: missing directory / file, a file that is not a training checkpoint (e.g. a
            ``model.pt``), or an unsupported format version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
        if not path.exists():
            raise ResumeError(f"{path.parent}: no {CHECKPOINT_NAME} in this directory; is it a run directory "
                              f"of `python -m locis_rl.pretrain` that wrote at least one checkpoint?")
    elif not path.exists():
        raise ResumeError(f"{path}: no such run directory or checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ResumeError(f"{path}: cannot be read as a training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = " (a model file from save_pretrained: use it with --init, not --resume)" \
            if found == "locis-rl-checkpoint" else ""
        raise ResumeError(f"{path}: not a locis-rl training checkpoint (format {found!r}){hint}")
    if ckpt.get("format_version") != TRAIN_FORMAT_VERSION:
        raise ResumeError(f"{path}: training checkpoint format_version {ckpt.get('format_version')!r} is not "
                          f"supported (expected {TRAIN_FORMAT_VERSION})")
    for key in ("config", "phases", "phase_index", "step", "model"):
        if key not in ckpt:
            raise ResumeError(f"{path}: training checkpoint lacks {key!r}")
    return ckpt
