"""Choosing the torch device from a user's ``device`` argument, with errors that say what to pass.

Every entry point (the wrappers, ``pretrain``, ``evaluate``, ``probe``, ``benchmark``, ``bench``,
``rl.compare``) takes the same device strings: ``"auto"`` (CUDA when torch sees a GPU, else the CPU),
``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
"""
from __future__ import annotations

import sys

import torch

__all__ = ["resolve_device", "cli_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else goes to ``torch.device``.

    Raises:
        ValueError: not a device name, or a CUDA device on a machine where torch sees none or fewer
            than its index (the message says what torch sees and how to fall back).
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', actual value: {device!r}") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r}, but torch sees no CUDA device (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'none'}); pass device='auto' to use "
                             "the GPU when there is one, else the CPU")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={device!r}, but torch sees {count} CUDA device(s): "
                             f"cuda:0 ... cuda:{count - 1}")
    return resolved


def cli_device(name: str, flag: str = "--device") -> str:
    """A command line's device argument, resolved (``"auto"`` becomes ``"cuda"`` or ``"cpu"``).

    Raises:
        SystemExit: a device torch cannot use here; the reason goes to stderr and the exit status is 2,
            as for argparse's own usage errors.
    """
    try:
        return str(resolve_device(name))
    except ValueError as exc:
        print(f"error: {flag} {name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
