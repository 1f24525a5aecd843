"""Checkpoint files shared by every locis-rl model (Loci-s, SAVi).

Layout (``torch.save`` of a plain dict, loadable with ``weights_only=True``)::

    {"format": "locis-rl-checkpoint", "format_version": 1, "model": "LociS" | "SAVi",
     "config": <config.to_dict()>, "state_dict": {...}, "locis_rl_version": "..."}

Files are written atomically (temporary file in the same folder, then ``os.replace``), so an
interrupted save never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "FORMAT_VERSION", "CheckpointError", "atomic_torch_save",
           "save_model_checkpoint", "load_model_checkpoint"]

CHECKPOINT_FORMAT = "locis-rl-checkpoint"
FORMAT_VERSION = 1
"""Bumped whenever the layout or the meaning of a stored field changes."""


class CheckpointError(ValueError):
    """A file that is not a (compatible) locis-rl checkpoint; the message names file and mismatch."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data (kill -9, power loss)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_model_checkpoint(model: nn.Module, model_name: str, path: str | os.PathLike) -> Path:
    """Write ``model`` (which has a ``config`` with ``to_dict``) in the layout above."""
    from locis_rl import __version__

    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "config": model.config.to_dict(),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "locis_rl_version": __version__,
    }
    return atomic_torch_save(payload, path)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def load_model_checkpoint(path: Path, *, model_name: str, config_from_dict: Callable[[dict], Any],
                          build: Callable[[Any], nn.Module], expected_config: Any = None,
                          map_location: Any = "cpu", wrong_model_hints: dict[str, str] | None = None,
                          adjust_config: Callable[[Any], Any] | None = None) -> nn.Module:
    """Read, check and build a model from a checkpoint written by :func:`save_model_checkpoint`.

    Args:
        path: an existing file (callers resolve names such as ``"default"`` and missing files).
        model_name: the ``"model"`` entry this loader accepts.
        config_from_dict: the config class's ``from_dict``.
        build: makes an untrained model from a config.
        expected_config: when given, every config field must equal the checkpoint's (after
            ``adjust_config``).
        wrong_model_hints: extra advice per foreign ``"model"`` entry (e.g. which loader to use).
        adjust_config: maps the checkpoint's config to the one the model is built with
            (inference-time overrides, e.g. :func:`locis_rl.model.config.apply_inference_overrides`);
            the weights must still fit it exactly. Its errors (``ConfigError``) propagate.

    Raises:
        CheckpointError: foreign file, wrong ``format_version`` or model, missing keys, config or
            parameter-shape mismatches, each named in the message together with the file.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything torch.load refuses is a foreign file
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path}: not a locis-rl checkpoint (torch.load failed: "
                              f"{type(exc).__name__}: {first_line})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a locis-rl checkpoint (format: expected "
                              f"{CHECKPOINT_FORMAT!r}, actual value: {found!r})")
    missing = [key for key in ("format_version", "model", "config", "state_dict") if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing the keys {missing}")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {ckpt['format_version']!r} is not supported "
                              f"(expected {FORMAT_VERSION}); re-save it with a matching locis-rl")
    if ckpt["model"] != model_name:
        hint = (wrong_model_hints or {}).get(ckpt["model"], "")
        raise CheckpointError(f"{path}: model: expected {model_name!r}, actual value: "
                              f"{ckpt['model']!r}{hint}")
    try:
        saved = config_from_dict(ckpt["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid config in checkpoint: {exc}") from exc
    if adjust_config is not None:
        saved = adjust_config(saved)
    if expected_config is not None:
        a, e = _flatten(saved.to_dict()), _flatten(expected_config.to_dict())
        diffs = [f"config.{key}: checkpoint {a.get(key)!r}, expected {e.get(key)!r}"
                 for key in sorted(set(a) | set(e)) if a.get(key) != e.get(key)]
        if diffs:
            raise CheckpointError(f"{path}: config mismatch: " + "; ".join(diffs))
    model = build(saved)
    own = model.state_dict()
    state_dict = ckpt["state_dict"]
    missing_keys = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{key}: checkpoint {tuple(state_dict[key].shape)}, expected {tuple(own[key].shape)}"
              for key in sorted(set(own) & set(state_dict)) if state_dict[key].shape != own[key].shape]
    if missing_keys or unexpected or shapes:
        parts = []
        if missing_keys:
            parts.append(f"missing parameters {missing_keys[:20]}")
        if unexpected:
            parts.append(f"unexpected parameters {unexpected[:20]}")
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:20]))
        raise CheckpointError(f"{path}: state_dict does not match the config: " + ", ".join(parts))
    model.load_state_dict(state_dict)
    device = map_location if isinstance(map_location, (str, torch.device)) else None
    return model.to(device) if device is not None else model
