"""RAdam + Lookahead (Zhang et al. 2019) and the per-stage learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from locis_rl.pretrain.config import OptimConfig

__all__ = ["Lookahead", "build_optimizer", "build_scheduler"]


class Lookahead(torch.optim.Optimizer):
    """Lookahead wrapper: every ``k`` steps of the inner ("fast") optimiser, the slow weights move
    ``alpha`` of the way towards the fast weights and the fast weights are reset to them.

    ``state_dict`` / ``load_state_dict`` hold the inner optimiser's state, the slow weights and the
    step counter, so a resumed run continues exactly. ``param_groups`` are the inner optimiser's
    (learning-rate schedulers work on the wrapper directly).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = 0.5, k: int = 6) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], actual value: {alpha}")
        if k < 1:
            raise ValueError(f"k must be >= 1, actual value: {k}")
        self.optimizer = optimizer
        self.alpha, self.k = float(alpha), int(k)
        self.step_count = 0
        # deliberately not calling Optimizer.__init__: groups and state belong to the inner optimiser
        self.defaults = optimizer.defaults
        self.slow: list[list[torch.Tensor]] = [
            [p.detach().clone() for p in group["params"]] for group in optimizer.param_groups
        ]
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = self.optimizer.step(closure)
        self.step_count += 1
        if self.alpha > 0 and self.step_count % self.k == 0:
            for group, slow_group in zip(self.optimizer.param_groups, self.slow):
                for p, slow in zip(group["params"], slow_group):
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "inner": self.optimizer.state_dict(),
            "slow": [[t.clone() for t in g] for g in self.slow],
            "step_count": self.step_count,
            "alpha": self.alpha,
            "k": self.k,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict["inner"])
        self.step_count = int(state_dict["step_count"])
        if len(state_dict["slow"]) != len(self.slow) or any(
            len(a) != len(b) for a, b in zip(state_dict["slow"], self.slow)
        ):
            raise ValueError("Lookahead state does not match the parameters")
        with torch.no_grad():
            for group, saved in zip(self.slow, state_dict["slow"]):
                for slow, t in zip(group, saved):
                    slow.copy_(t.to(slow.device, slow.dtype))

    def __repr__(self) -> str:
        return f"Lookahead(alpha={self.alpha}, k={self.k}, {self.optimizer!r})"


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg.name`` (RAdam or AdamW) with ``lr, weight_decay``, wrapped in :class:`Lookahead`
    unless ``lookahead_alpha`` is 0."""
    params = [p for p in params if p.requires_grad]
    optimizers = {"radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    if cfg.name not in optimizers:
        raise ValueError(f"optim.name: expected one of {sorted(optimizers)}, actual value: {cfg.name!r}")
    inner = optimizers[cfg.name](params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lookahead_alpha <= 0:
        return inner
    return Lookahead(inner, alpha=cfg.lookahead_alpha, k=cfg.lookahead_k)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 10% of ``lr``."""
    warmup = max(0, int(cfg.warmup_steps))
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
