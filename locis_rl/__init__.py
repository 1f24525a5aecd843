"""locis-rl: Loci-Segmented object-centric perception for reinforcement learning."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Registers the `locis/...` Gymnasium ids as a side effect, like `import envs` does.
import envs as _envs  # noqa: F401,E402

_LAZY = {
    "LociS": "locis_rl.model",
    "LociSConfig": "locis_rl.model",
    "LociSWrapper": "locis_rl.rl",
    "LociSVectorWrapper": "locis_rl.rl",
    "LociSVecEnvWrapper": "locis_rl.rl.sb3",
}


def __getattr__(name: str) -> Any:
    # Heavy modules (torch models, wrappers) load on first use so `import locis_rl` stays cheap.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'locis_rl' has no attribute {name!r}")
