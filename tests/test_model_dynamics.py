"""Percept gate, GateL0RD transition and slot assignment (tiny preset, CPU, a few seconds)."""
from __future__ import annotations

import math

import pytest
import torch

from locis_rl.model.config import AssignmentConfig, LociSConfig
from locis_rl.model.percept_gate import PerceptGate
from locis_rl.model.slot_assignment import (
    assign_proposals_to_free_slots,
    assign_to_free_slots,
    positions_from_masks,
    regularize_slots,
    sample_free_slot_positions,
    unexplained_foreground,
)
from locis_rl.model.transition import GateL0RDCell, SlotTransition


@pytest.fixture(scope="module")
def cfg() -> LociSConfig:
    return LociSConfig.preset("tiny")


def _states(cfg: LociSConfig, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k, gd = cfg.num_slots, cfg.gestalt_dim
    position = torch.cat([torch.rand(b, k, 2, generator=g) * 2 - 1,
                          torch.rand(b, k, 1, generator=g) * 0.2 + 0.05,
                          torch.randn(b, k, 1, generator=g)], dim=-1)
    gestalt = torch.rand(b, k, gd, generator=g) * 0.98 + 0.01
    return position, gestalt


def _gate_inputs(cfg: LociSConfig, b: int = 2):
    obs_p, obs_g = _states(cfg, b, seed=1)
    pred_p, pred_g = _states(cfg, b, seed=2)
    last_p, _ = _states(cfg, b, seed=3)
    return obs_p, obs_g, pred_p, pred_g, last_p


# ---- percept gate -------------------------------------------------------------------------------

def test_percept_gate_shapes_and_open_at_init(cfg):
    torch.manual_seed(0)
    gate = PerceptGate(cfg).eval()
    out = gate(*_gate_inputs(cfg, b=3))
    k, gd = cfg.num_slots, cfg.gestalt_dim
    assert out["position"].shape == (3, k, 4)
    assert out["gestalt"].shape == (3, k, gd)
    assert out["gate"].shape == (3, k, 2)
    assert out["l0"].shape == (3,)
    assert (out["gate"] > 0.9).all()  # tanh(3) ~ 0.995: gates start open
    assert torch.allclose(out["l0"], torch.ones(3))


def test_percept_gate_closed_returns_prediction_exactly(cfg):
    torch.manual_seed(0)
    gate = PerceptGate(cfg)
    with torch.no_grad():
        gate.output.bias.fill_(-100.0)
    obs_p, obs_g, pred_p, pred_g, last_p = _gate_inputs(cfg)
    for training in (False, True):  # noise of std 0.1 cannot reopen a gate at -100
        gate.train(training)
        out = gate(obs_p, obs_g, pred_p, pred_g, last_p)
        assert (out["gate"] == 0).all()
        assert torch.equal(out["position"], pred_p)
        assert torch.equal(out["gestalt"], pred_g)
        assert (out["l0"] == 0).all()


def test_percept_gate_wide_open_returns_observation(cfg):
    gate = PerceptGate(cfg).eval()
    with torch.no_grad():
        gate.output.bias.fill_(30.0)
    obs_p, obs_g, pred_p, pred_g, last_p = _gate_inputs(cfg)
    out = gate(obs_p, obs_g, pred_p, pred_g, last_p)
    assert torch.allclose(out["position"], obs_p, atol=1e-5)
    assert torch.allclose(out["gestalt"], obs_g, atol=1e-5)


def test_percept_gate_noise_only_in_training(cfg):
    torch.manual_seed(0)
    gate = PerceptGate(cfg)
    with torch.no_grad():
        gate.output.bias.fill_(0.5)  # away from tanh saturation, so noise is visible
    inputs = _gate_inputs(cfg)
    gate.eval()
    a, b = gate(*inputs)["gate"], gate(*inputs)["gate"]
    assert torch.equal(a, b)
    gate.train()
    c, d = gate(*inputs)["gate"], gate(*inputs)["gate"]
    assert not torch.equal(c, d)


def test_percept_gate_l0_and_blend_have_gradient(cfg):
    torch.manual_seed(0)
    gate = PerceptGate(cfg).train()
    out = gate(*_gate_inputs(cfg))
    out["l0"].sum().backward()
    assert gate.output.bias.grad is not None and (gate.output.bias.grad > 0).all()
    gate.zero_grad()
    out = gate(*_gate_inputs(cfg))
    (out["position"].sum() + out["gestalt"].sum() + out["l0"].sum()).backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- GateL0RD / transition ----------------------------------------------------------------------

def test_gatel0rd_closed_gate_keeps_hidden():
    torch.manual_seed(0)
    cell = GateL0RDCell(8, 16, gate_noise_std=0.1).eval()
    with torch.no_grad():  # gate pre-activations are the first 16 outputs of gate_and_candidate
        cell.gate_and_candidate.weight[:16].zero_()
        cell.gate_and_candidate.bias[:16].fill_(-1.0)
    x, h = torch.randn(5, 8), torch.randn(5, 16).tanh()
    y, h_new, gate = cell(x, h)
    assert y.shape == (5, 16) and h_new.shape == (5, 16) and gate.shape == (5, 16)
    assert (gate == 0).all()
    assert torch.equal(h_new, h)


def test_gatel0rd_open_gate_moves_hidden():
    torch.manual_seed(0)
    cell = GateL0RDCell(8, 16).eval()
    with torch.no_grad():
        cell.gate_and_candidate.weight[:16].zero_()
        cell.gate_and_candidate.bias[:16].fill_(20.0)  # tanh(20) == 1 in float32
    x, h = torch.randn(5, 8), torch.zeros(5, 16)
    y, h_new, gate = cell(x, h)
    r = cell.gate_and_candidate(torch.cat([x, h], -1))[:, 16:].tanh()
    assert torch.allclose(h_new, r, atol=1e-6)
    assert (y.abs() < 1).all()


def test_transition_shapes_and_near_identity(cfg):
    torch.manual_seed(0)
    model = SlotTransition(cfg).eval()
    b, k = 2, cfg.num_slots
    position, gestalt = _states(cfg, b)
    hidden = model.init_hidden(b, k, device=None, dtype=torch.float32)
    assert hidden.shape == (b, k, cfg.transition.layers, cfg.transition.hidden)
    assert (hidden == 0).all()
    presence = torch.ones(b, k)
    out = model(position, gestalt, hidden, presence)
    assert out["position"].shape == (b, k, 4)
    assert out["gestalt"].shape == (b, k, cfg.gestalt_dim)
    assert out["hidden"].shape == hidden.shape
    assert out["l0"].shape == (b,)
    assert (out["position"] - position).abs().max() < 0.05
    assert (out["gestalt"] - gestalt).abs().max() < 0.02
    assert ((out["gestalt"] > 0) & (out["gestalt"] < 1)).all()
    assert (out["position"][..., 2] > 0).all()
    assert not torch.equal(out["hidden"], hidden)  # the recurrent state does move


def test_transition_clamps_position(cfg):
    torch.manual_seed(0)
    model = SlotTransition(cfg).eval()
    position, gestalt = _states(cfg, 1)
    position[..., :2] = 3.0
    position[..., 2] = 0.0
    out = model(position, gestalt, model.init_hidden(1, cfg.num_slots), torch.ones(1, cfg.num_slots))
    assert (out["position"][..., :2].abs() <= 1.5).all()
    assert (out["position"][..., 2] > 0).all()


def test_transition_rows_independent(cfg):
    torch.manual_seed(0)
    model = SlotTransition(cfg).eval()
    b, k = 3, cfg.num_slots
    position, gestalt = _states(cfg, b)
    hidden = torch.randn(b, k, cfg.transition.layers, cfg.transition.hidden).tanh()
    presence = torch.ones(b, k)
    presence[0, 1] = 0
    out = model(position, gestalt, hidden, presence)
    position2, gestalt2, hidden2 = position.clone(), gestalt.clone(), hidden.clone()
    position2[2] += 0.3
    gestalt2[2] = 1 - gestalt2[2]
    hidden2[2] = -hidden2[2]
    presence2 = presence.clone()
    presence2[2, :3] = 0
    out2 = model(position2, gestalt2, hidden2, presence2)
    for key in ("position", "gestalt", "hidden"):
        assert torch.allclose(out[key][:2], out2[key][:2], atol=1e-6), key
        assert not torch.allclose(out[key][2], out2[key][2], atol=1e-6), key
    assert torch.allclose(out["l0"][:2], out2["l0"][:2], atol=1e-6)
    single = model(position[1:2], gestalt[1:2], hidden[1:2], presence[1:2])
    for key in ("position", "gestalt", "hidden", "l0"):
        assert torch.allclose(single[key], out[key][1:2], atol=1e-6), key


def test_transition_absent_slots_do_not_influence_present(cfg):
    torch.manual_seed(0)
    model = SlotTransition(cfg).eval()
    b, k = 2, cfg.num_slots
    position, gestalt = _states(cfg, b)
    hidden = torch.randn(b, k, cfg.transition.layers, cfg.transition.hidden).tanh()
    presence = torch.ones(b, k, dtype=torch.bool)
    presence[:, 2] = False
    presence[1, 4] = False
    out = model(position, gestalt, hidden, presence)
    position2, gestalt2, hidden2 = position.clone(), gestalt.clone(), hidden.clone()
    position2[:, 2] = torch.tensor([0.9, -0.9, 0.3, 5.0])
    gestalt2[:, 2] = 1 - gestalt2[:, 2]
    hidden2[:, 2] = -hidden2[:, 2]
    position2[1, 4] = -position2[1, 4]
    out2 = model(position2, gestalt2, hidden2, presence)
    keep = presence
    for key in ("position", "gestalt", "hidden"):
        assert torch.allclose(out[key][keep], out2[key][keep], atol=1e-6), key
    assert torch.allclose(out["l0"], out2["l0"], atol=1e-6)
    # ... while present slots do attend to each other
    position3 = position.clone()
    position3[:, 0] += 0.5
    out3 = model(position3, gestalt, hidden, presence)
    assert not torch.allclose(out["hidden"][:, 1], out3["hidden"][:, 1], atol=1e-6)


def test_transition_all_absent_row_is_finite(cfg):
    model = SlotTransition(cfg).eval()
    position, gestalt = _states(cfg, 2)
    presence = torch.zeros(2, cfg.num_slots)
    out = model(position, gestalt, model.init_hidden(2, cfg.num_slots), presence)
    for value in out.values():
        assert torch.isfinite(value).all()
    assert (out["l0"] == 0).all()


def test_transition_gradients_reach_all_parameters(cfg):
    torch.manual_seed(0)
    model = SlotTransition(cfg).train()
    b, k = 2, cfg.num_slots
    position, gestalt = _states(cfg, b)
    hidden = model.init_hidden(b, k)
    presence = torch.ones(b, k)
    loss = 0.0
    for _ in range(2):  # two steps: gradients also flow through the recurrent state
        out = model(position, gestalt, hidden, presence)
        hidden = out["hidden"]
        position, gestalt = out["position"], out["gestalt"]
        loss = loss + out["position"].pow(2).sum() + out["gestalt"].sum() + out["l0"].sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---- slot assignment ----------------------------------------------------------------------------

def test_sampling_all_mass_at_one_pixel():
    b, h, w, k = 2, 16, 12, 5
    weights = torch.zeros(b, h, w)
    weights[0, 3, 7] = 2.0
    weights[1, 15, 0] = 0.5
    free = torch.tensor([[True, False, True, True, False], [True] * 5])
    pos = sample_free_slot_positions(weights, free, 0.1, torch.Generator().manual_seed(0))
    assert pos.shape == (b, k, 4)
    expect0 = torch.tensor([-1 + 2 * 7 / (w - 1), -1 + 2 * 3 / (h - 1), 0.1, 0.0])
    expect1 = torch.tensor([-1.0, 1.0, 0.1, 0.0])
    assert torch.allclose(pos[0, free[0]], expect0.expand(3, 4))
    assert (pos[0, ~free[0]] == 0).all()
    assert torch.allclose(pos[1], expect1.expand(5, 4))


def test_sampling_reproducible_and_proportional():
    b, h, w, k = 4, 8, 8, 200
    weights = torch.rand(b, h, w)
    free = torch.ones(b, k, dtype=torch.bool)
    a = sample_free_slot_positions(weights, free, 0.1, torch.Generator().manual_seed(7))
    c = sample_free_slot_positions(weights, free, 0.1, torch.Generator().manual_seed(7))
    d = sample_free_slot_positions(weights, free, 0.1, torch.Generator().manual_seed(8))
    assert torch.equal(a, c)
    assert not torch.equal(a, d)
    # two pixels with weights 3 : 1
    weights = torch.zeros(1, h, w)
    weights[0, 0, 0], weights[0, 7, 7] = 3.0, 1.0
    pos = sample_free_slot_positions(weights, torch.ones(1, 4000, dtype=torch.bool), 0.1,
                                     torch.Generator().manual_seed(0))
    frac = (pos[0, :, 0] < 0).float().mean().item()
    assert abs(frac - 0.75) < 0.04


def test_sampling_zero_weight_row_falls_back_to_uniform():
    weights = torch.zeros(2, 8, 8)
    weights[1, 2, 2] = 1.0
    pos = sample_free_slot_positions(weights, torch.ones(2, 300, dtype=torch.bool), 0.2,
                                     torch.Generator().manual_seed(0))
    assert torch.isfinite(pos).all()
    assert pos[0, :, :2].abs().max() <= 1.0
    assert pos[0, :, 0].unique().numel() == 8  # every column gets hit


def test_regularize_drops_duplicates_only():
    cfg = AssignmentConfig(reg_distance=0.15, reg_correlation=0.8, reg_drop_probability=1.0)
    g = torch.Generator().manual_seed(0)
    code = torch.rand(64, generator=g)
    other = torch.rand(64, generator=g)
    position = torch.tensor([[[0.1, 0.1, 0.1, 0.0], [0.12, 0.1, 0.1, 0.0], [0.8, -0.8, 0.1, 0.0],
                              [0.11, 0.09, 0.1, 0.0]]]).repeat(2, 1, 1)
    gestalt = torch.stack([code, code, code, other])[None].repeat(2, 1, 1)
    presence = torch.ones(2, 4)
    presence[1, 0] = 0  # row 1: slot 0 absent, so slot 1 has no present duplicate
    out = regularize_slots(position, gestalt, presence, cfg, torch.Generator().manual_seed(1))
    assert out.dtype == presence.dtype
    # slot 1 duplicates slot 0 (same code, close); slot 2 is far; slot 3 is close, different code
    assert out[0].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert out[1].tolist() == [0.0, 1.0, 1.0, 1.0]
    never = regularize_slots(position, gestalt, presence,
                             AssignmentConfig(reg_drop_probability=0.0), None)
    assert torch.equal(never, presence)
    bool_out = regularize_slots(position, gestalt, presence > 0, cfg, None)
    assert bool_out.dtype == torch.bool and bool_out[0].tolist() == [True, False, True, True]


def test_regularize_keeps_one_of_a_duplicate_group():
    cfg = AssignmentConfig(reg_drop_probability=1.0)
    code = torch.rand(32, generator=torch.Generator().manual_seed(3))
    position = torch.zeros(1, 5, 4)
    gestalt = code.expand(1, 5, 32).clone()
    out = regularize_slots(position, gestalt, torch.ones(1, 5), cfg, None)
    assert out[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_positions_from_masks_square():
    h = w = 64
    masks = torch.zeros(1, 3, h, w)
    masks[0, 0, 16:32, 32:48] = 1.0  # rows 16..31, cols 32..47
    masks[0, 1, 0:8, 0:8] = 1.0
    valid = torch.tensor([[True, False, True]])  # slot 2 valid but empty
    pos = positions_from_masks(masks, valid)
    assert pos.shape == (1, 3, 4)
    step = 2 / (w - 1)
    cx = -1 + step * (32 + 47) / 2
    cy = -1 + step * (16 + 31) / 2
    std = step * math.sqrt((16 ** 2 - 1) / 12)  # std of 16 evenly spaced pixel centres
    assert torch.allclose(pos[0, 0], torch.tensor([cx, cy, std, 0.0]), atol=1e-5)
    assert (pos[0, 1] == 0).all() and (pos[0, 2] == 0).all()


def test_assign_to_free_slots_in_order():
    b, q, k, h, w = 2, 4, 5, 4, 4
    cand = torch.arange(b * q * 4, dtype=torch.float32).view(b, q, 4) + 1
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    masks = torch.rand(b, q, h, w)
    free = torch.tensor([[False, True, True, False, True], [True, False, False, True, False]])
    position, assigned, slot_masks = assign_to_free_slots(cand, valid, masks, free)
    assert assigned.tolist() == [[False, True, True, False, True], [True, False, False, True, False]]
    assert torch.equal(position[0, 1], cand[0, 0])
    assert torch.equal(position[0, 2], cand[0, 2])
    assert torch.equal(position[0, 4], cand[0, 3])
    assert torch.equal(position[1, 0], cand[1, 0])  # extra candidates 2, 3 of row 1 dropped
    assert torch.equal(position[1, 3], cand[1, 1])
    assert (position[~assigned] == 0).all()
    assert torch.equal(slot_masks[0, 4], masks[0, 3])
    assert (slot_masks[~assigned] == 0).all()
    # fewer valid candidates than free slots: the later free slots stay unassigned
    valid2 = torch.tensor([[False, False, True, False], [False] * 4])
    position2, assigned2, none = assign_proposals_to_free_slots(cand, valid2, None, free)
    assert none is None
    assert assigned2.tolist() == [[False, True, False, False, False], [False] * 5]
    assert torch.equal(position2[0, 1], cand[0, 2])
    assert (position2[~assigned2] == 0).all()


def test_unexplained_foreground():
    fg = torch.zeros(1, 1, 4, 4)
    fg[0, 0, :2] = 1.0
    slot_masks = torch.zeros(1, 2, 4, 4)
    slot_masks[0, 0, 0] = 1.0  # covers row 0
    slot_masks[0, 1, 1] = 1.0  # covers row 1, but the slot is absent
    out = unexplained_foreground(fg, slot_masks, torch.tensor([[1.0, 0.0]]))
    assert out.shape == (1, 4, 4)
    assert (out[0, 0] == 0).all() and (out[0, 1] == 1).all() and (out[0, 2:] == 0).all()
