"""Kalman-like percept gate (paper appendix A.1, eqs. 1-4; table 5 "UpdateController").

Per slot, a small MLP ``g_theta`` looks at the observed state (encoder output), the predicted
state (transition output) and the last position, and emits two logits ``(z_G, z_P)``. The gates
``alpha = ReTanh(z) = max(0, tanh(z))`` blend observation and prediction:

    G = alpha_G * G_observed + (1 - alpha_G) * G_predicted        (1)
    P = alpha_P * P_observed + (1 - alpha_P) * P_predicted        (2)

``alpha`` can be exactly zero, in which case the prediction is returned bit for bit.

Decisions where the paper is silent:
- ``percept_gate.layers`` counts the Linear layers of ``g_theta`` including the output layer
  (table 5: Linear -> SiLU -> Linear -> SiLU -> Linear(256 -> 2) is ``layers = 3``).
- The output layer's weights are scaled by :data:`OUTPUT_WEIGHT_SCALE` and its bias set to
  ``initial_bias``, so at initialisation every gate is open (``tanh(3) ~ 0.995``) whatever the input.
- The L0 penalty uses a straight-through Heaviside on ``alpha``: the forward value counts open gates
  (``alpha > 0``), the backward pass treats the step as the identity, so the gradient reaches ``z``
  through ``d tanh`` of the open gates only (closed gates get none, as in GateL0RD; the training
  noise lets them reopen).
- Gate noise ``N(0, noise_std)`` is added to the logits only when ``module.training`` is True.
"""
from __future__ import annotations

import torch
from torch import nn

from locis_rl.model.config import LociSConfig

__all__ = ["PerceptGate", "retanh", "heaviside_st", "OUTPUT_WEIGHT_SCALE"]

OUTPUT_WEIGHT_SCALE = 0.1
"""Scale of the gate MLP's output-layer weights at initialisation (keeps the bias dominant)."""


def retanh(x: torch.Tensor) -> torch.Tensor:
    """Rectified tanh ``max(0, tanh(x))``: in ``[0, 1)``, exactly 0 for ``x <= 0``."""
    return torch.tanh(x).clamp_min(0.0)


class _HeavisideST(torch.autograd.Function):
    """Forward ``(x > 0)``, backward identity (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_output


def heaviside_st(x: torch.Tensor) -> torch.Tensor:
    """Count of ``x > 0`` (0/1 per element) with a straight-through (identity) gradient."""
    return _HeavisideST.apply(x)


class PerceptGate(nn.Module):
    """Blend observed and predicted slot states with learned, exactly-closable gates.

    Shapes:
        observed_position, predicted_position, last_position: ``[B, K, 4]``;
        observed_gestalt, predicted_gestalt: ``[B, K, G]``.

    Returns:
        dict with ``position [B,K,4]``, ``gestalt [B,K,G]``, ``gate [B,K,2]`` (``alpha_G, alpha_P``
        in ``[0, 1)``, exact zeros possible) and ``l0 [B]`` (mean over slots and both gates of the
        straight-through count of open gates).
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        cfg = config.percept_gate
        self.gestalt_dim = config.gestalt_dim
        self.position_dim = config.position_dim
        self.noise_std = float(cfg.noise_std)
        in_features = 2 * (self.gestalt_dim + self.position_dim) + self.position_dim
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(max(int(cfg.layers), 1) - 1):
            layers += [nn.Linear(width, cfg.hidden), nn.SiLU()]
            width = cfg.hidden
        self.output = nn.Linear(width, 2)
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            self.output.weight.mul_(OUTPUT_WEIGHT_SCALE)
            self.output.bias.fill_(float(cfg.initial_bias))

    def logits(self, observed_position: torch.Tensor, observed_gestalt: torch.Tensor,
               predicted_position: torch.Tensor, predicted_gestalt: torch.Tensor,
               last_position: torch.Tensor) -> torch.Tensor:
        """Noise-free gate logits ``z`` ``[B, K, 2]`` (``z_G, z_P``)."""
        features = torch.cat([observed_position, observed_gestalt, predicted_position,
                              predicted_gestalt, last_position], dim=-1)
        return self.output(self.body(features))

    def forward(self, observed_position: torch.Tensor, observed_gestalt: torch.Tensor,
                predicted_position: torch.Tensor, predicted_gestalt: torch.Tensor,
                last_position: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.logits(observed_position, observed_gestalt, predicted_position,
                        predicted_gestalt, last_position)
        if self.training and self.noise_std > 0:
            z = z + torch.randn_like(z) * self.noise_std
        alpha = retanh(z)
        alpha_g = alpha[..., 0:1]
        alpha_p = alpha[..., 1:2]
        gestalt = alpha_g * observed_gestalt + (1.0 - alpha_g) * predicted_gestalt
        position = alpha_p * observed_position + (1.0 - alpha_p) * predicted_position
        l0 = heaviside_st(alpha).mean(dim=(1, 2))
        return {"position": position, "gestalt": gestalt, "gate": alpha, "l0": l0}
