"""Shared test setup: headless MuJoCo, one torch thread per pytest worker, fixed seeds."""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# CI has 2 cores and runs two pytest workers; more torch threads per worker only oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
