"""Atomic file writes: write next to the target, then ``os.replace`` it into place.

A reader (or a run resumed after ``kill -9``) sees either the old file or the complete new one,
never a half-written file. Checkpoints use :func:`locis_rl.model.checkpoint_io.atomic_torch_save`,
which adds a unique temporary name and an ``fsync``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["write_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to ``.<name>.tmp`` beside ``path`` (folders created), then ``os.replace``.

    The temporary file is removed if ``write`` raises. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
