"""Slot transition (predictor): GateL0RD cells interleaved with slot self-attention (table 5).

``SlotTransition`` maps the current slot states ``(position, gestalt)`` and the recurrent hidden
state to a next-frame prediction. Wiring per slot (slots folded into the batch, ``N = B * K``)::

    x = Linear(G+4 -> hidden) -> SiLU -> Linear(hidden -> hidden)
    for layer l in 0..L-1:
        x = x + GateL0RD_l(x, h_l)                       (h_l updated)
        if l < L-1: x = x + SelfAttention_l(LayerNorm(x)) across the K slots of one row
    delta = Linear(hidden -> hidden) -> SiLU -> Linear(hidden -> G+4)
    next state = input state + delta (re-squashed, see below)

Decisions where the paper / contract is silent:
- Residual connections around each GateL0RD cell and each attention layer (pre-LayerNorm over the
  feature dimension only, so rows stay independent).
- The output layer's weights are scaled by :data:`OUTPUT_WEIGHT_SCALE` and its bias is zero, so an
  untrained transition is close to the identity.
- Gestalt: ``sigmoid(logit(clamp(g, eps, 1 - eps)) + delta_G)`` ("sigmoid of the logit-sum"): stays in
  ``(0, 1)``, never loses its gradient at the bounds, and equals the input (up to ``eps``) for
  ``delta = 0``.
- Position: ``x, y`` = input + delta clamped to ``[-1.5, 1.5]``; ``size = clamp_min(size, 1e-3) *
  exp(delta)`` (positive; multiplicative near-identity); priority = input + delta (unbounded).
- Absent slots are masked as attention keys (a slot always attends to itself, so no row of the
  attention is fully masked). Absent slots are still computed (their hidden state changes too);
  callers reset the hidden state of a slot when it is (re)assigned.
- ``l0`` per row: the straight-through count of open GateL0RD gates, averaged over layers, hidden
  units and the *present* slots (``presence > PRESENT_THRESHOLD``); 0 for a row without present slots.
- Ordinary backpropagation through time; no eligibility traces.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from locis_rl.model.config import LociSConfig
from locis_rl.model.percept_gate import heaviside_st, retanh

__all__ = ["GateL0RDCell", "SlotSelfAttention", "SlotTransition", "OUTPUT_WEIGHT_SCALE",
           "GESTALT_EPS", "POSITION_LIMIT", "MIN_SIZE", "PRESENT_THRESHOLD"]

OUTPUT_WEIGHT_SCALE = 0.01
"""Scale of the output embedding's last-layer weights at initialisation (near-identity start)."""
GESTALT_EPS = 1e-6
"""Gestalt values are clamped to ``[eps, 1 - eps]`` before the logit."""
POSITION_LIMIT = 1.5
"""Predicted ``x, y`` are clamped to ``[-POSITION_LIMIT, POSITION_LIMIT]``."""
MIN_SIZE = 1e-3
"""Sizes are clamped at this value before the multiplicative update."""
PRESENT_THRESHOLD = 0.5
"""A float ``presence`` above this counts as present (attention key, L0 average)."""
MAX_LOG_SIZE_STEP = 5.0
"""Bound on the per-step log-size change (keeps ``exp`` finite)."""


class GateL0RDCell(nn.Module):
    """GateL0RD recurrent cell (Gumbsch et al., 2021), ordinary backprop.

    ``g = ReTanh(W_g [x, h] + noise)`` (noise ``N(0, gate_noise_std)`` only in training),
    ``r = tanh(W_r [x, h])``, ``h' = g * r + (1 - g) * h``,
    ``y = tanh(W_p [x, h']) * sigmoid(W_o [x, h'])``.
    A gate that is exactly 0 leaves its hidden unit bit-for-bit unchanged.

    ``forward(x [N, input_size], h [N, hidden_size]) -> (y [N, H], h_new [N, H], gate [N, H])``.
    """

    def __init__(self, input_size: int, hidden_size: int, gate_noise_std: float = 0.1) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.gate_noise_std = float(gate_noise_std)
        self.gate_and_candidate = nn.Linear(input_size + hidden_size, 2 * hidden_size)
        self.output = nn.Linear(input_size + hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, r = self.gate_and_candidate(torch.cat([x, h], dim=-1)).chunk(2, dim=-1)
        if self.training and self.gate_noise_std > 0:
            s = s + torch.randn_like(s) * self.gate_noise_std
        gate = retanh(s)
        h_new = gate * torch.tanh(r) + (1.0 - gate) * h
        p, o = self.output(torch.cat([x, h_new], dim=-1)).chunk(2, dim=-1)
        y = torch.tanh(p) * torch.sigmoid(o)
        return y, h_new, gate


class SlotSelfAttention(nn.Module):
    """Pre-LayerNorm multi-head self-attention across the slots of one row (residual outside).

    ``forward(x [B, K, D], present [B, K] bool) -> [B, K, D]``; key ``j`` is visible to query ``i``
    iff slot ``j`` is present or ``i == j``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, actual values: {dim}, {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        q, key, v = self.qkv(self.norm(x)).view(b, k, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)  # each [B, heads, K, d_head]
        eye = torch.eye(k, dtype=torch.bool, device=x.device)
        allowed = present[:, None, :] | eye[None]  # [B, K(query), K(key)]
        scores = (q @ key.transpose(-1, -2)) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [B, heads, K, d_head]
        return self.proj(out.transpose(1, 2).reshape(b, k, d))


class SlotTransition(nn.Module):
    """Next-frame slot prediction (see the module docstring for the wiring).

    ``forward(position [B,K,4], gestalt [B,K,G], hidden [B,K,L,hidden], presence [B,K]) ->
    dict(position [B,K,4], gestalt [B,K,G], hidden [B,K,L,hidden], l0 [B])``.
    """

    def __init__(self, config: LociSConfig) -> None:
        super().__init__()
        cfg = config.transition
        self.gestalt_dim = config.gestalt_dim
        self.position_dim = config.position_dim
        self.hidden = int(cfg.hidden)
        self.num_layers = int(cfg.layers)
        state = self.gestalt_dim + self.position_dim
        self.input_embedding = nn.Sequential(
            nn.Linear(state, self.hidden), nn.SiLU(), nn.Linear(self.hidden, self.hidden))
        self.cells = nn.ModuleList(
            GateL0RDCell(self.hidden, self.hidden, cfg.gate_noise_std) for _ in range(self.num_layers))
        self.attention = nn.ModuleList(
            SlotSelfAttention(self.hidden, cfg.heads) for _ in range(self.num_layers - 1))
        self.output_embedding = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.SiLU(), nn.Linear(self.hidden, state))
        with torch.no_grad():
            last = self.output_embedding[-1]
            last.weight.mul_(OUTPUT_WEIGHT_SCALE)
            last.bias.zero_()

    def init_hidden(self, batch: int, K: int, device=None, dtype=None) -> torch.Tensor:
        """Zero hidden state ``[batch, K, layers, hidden]``."""
        return torch.zeros(batch, K, self.num_layers, self.hidden, device=device,
                           dtype=dtype if dtype is not None else torch.get_default_dtype())

    def forward(self, position: torch.Tensor, gestalt: torch.Tensor, hidden: torch.Tensor,
                presence: torch.Tensor) -> dict[str, torch.Tensor]:
        b, k, _ = position.shape
        n = b * k
        present = presence if presence.dtype == torch.bool else presence > PRESENT_THRESHOLD
        state = torch.cat([position, gestalt], dim=-1)
        x = self.input_embedding(state)  # [B, K, hidden]
        new_hidden = []
        gate_counts = []
        for layer, cell in enumerate(self.cells):
            y, h, gate = cell(x.reshape(n, self.hidden), hidden[:, :, layer].reshape(n, self.hidden))
            x = x + y.view(b, k, self.hidden)
            new_hidden.append(h.view(b, k, self.hidden))
            gate_counts.append(heaviside_st(gate).view(b, k, self.hidden).mean(dim=-1))
            if layer < len(self.attention):
                x = x + self.attention[layer](x, present)
        delta = self.output_embedding(x)
        d_pos, d_gestalt = delta[..., : self.position_dim], delta[..., self.position_dim:]

        xy = (position[..., :2] + d_pos[..., :2]).clamp(-POSITION_LIMIT, POSITION_LIMIT)
        size = position[..., 2:3].clamp_min(MIN_SIZE) * torch.exp(
            d_pos[..., 2:3].clamp(-MAX_LOG_SIZE_STEP, MAX_LOG_SIZE_STEP))
        priority = position[..., 3:4] + d_pos[..., 3:4]
        new_position = torch.cat([xy, size, priority], dim=-1)
        new_gestalt = torch.sigmoid(
            torch.logit(gestalt.clamp(GESTALT_EPS, 1.0 - GESTALT_EPS)) + d_gestalt)

        weight = present.to(x.dtype)
        per_slot = torch.stack(gate_counts, dim=-1).mean(dim=-1)  # [B, K]
        l0 = (per_slot * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-6)
        return {"position": new_position, "gestalt": new_gestalt,
                "hidden": torch.stack(new_hidden, dim=2), "l0": l0}
