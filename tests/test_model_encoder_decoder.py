"""Tests of the slot encoder, the cascaded decoder, composition and scene-relative depth."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from locis_rl.model.config import LociSConfig
from locis_rl.model.decoder import CascadedDecoder, compose
from locis_rl.model.depth_input import scene_relative_depth
from locis_rl.model.encoder import (MAX_POSITION_SIZE, MIN_POSITION_SIZE, HyperConvNeXtBlock,
                                    HyperConvNeXtEncoder)


def _inputs(cfg: LociSConfig, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.encoder_in_channels, cfg.image_size, cfg.image_size, generator=gen)
    prior = torch.rand(n, cfg.gestalt_dim, generator=gen)
    return x, prior


def _perturb_hypernetworks(module: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Give the zero-initialised last hypernetwork layers non-zero weights (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in module.modules():
            if isinstance(block, HyperConvNeXtBlock):
                last = block.hypernetwork[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def tiny() -> LociSConfig:
    return LociSConfig.preset("tiny")


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("use_depth", [False, True])
def test_output_shapes(preset: str, use_depth: bool) -> None:
    torch.manual_seed(0)
    cfg = LociSConfig.preset(preset).replace(use_depth=use_depth)
    enc, dec = HyperConvNeXtEncoder(cfg).eval(), CascadedDecoder(cfg).eval()
    n, hw = 3, cfg.image_size
    x, prior = _inputs(cfg, n)
    assert x.shape[1] == (14 if use_depth else 12)
    with torch.no_grad():
        position, gestalt = enc(x, prior)
        out = dec(position, gestalt)
        mask_only = dec.decode_mask(position, gestalt)
    assert position.shape == (n, 4) and gestalt.shape == (n, cfg.gestalt_dim)
    assert position[:, :2].abs().max() <= 1
    assert ((position[:, 2] >= MIN_POSITION_SIZE) & (position[:, 2] <= MAX_POSITION_SIZE)).all()
    assert ((gestalt >= 0) & (gestalt <= 1)).all()
    assert out["mask_logits"].shape == (n, 1, hw, hw) and mask_only.shape == (n, 1, hw, hw)
    assert out["depth"].shape == (n, 1, hw, hw) and out["rgb"].shape == (n, 3, hw, hw)
    for key in ("depth", "rgb"):
        assert ((out[key] >= 0) & (out[key] <= 1)).all()
    torch.testing.assert_close(mask_only, out["mask_logits"])


def test_wrong_input_shapes_raise(tiny: LociSConfig) -> None:
    enc = HyperConvNeXtEncoder(tiny)
    x, prior = _inputs(tiny, 2)
    with pytest.raises(ValueError, match="inputs"):
        enc(x[:, :5], prior)
    with pytest.raises(ValueError, match="gestalt_prior"):
        enc(x, prior[:, :7])
    with pytest.raises(ValueError, match="gestalt"):
        CascadedDecoder(tiny)(torch.zeros(2, 4), torch.zeros(2, 5))


def test_gradients_reach_every_parameter(tiny: LociSConfig) -> None:
    torch.manual_seed(0)
    enc, dec = HyperConvNeXtEncoder(tiny).train(), CascadedDecoder(tiny).train()
    x, prior = _inputs(tiny, 4)

    def backward() -> None:
        enc.zero_grad(set_to_none=True)
        dec.zero_grad(set_to_none=True)
        position, gestalt = enc(x, prior)
        out = dec(position, gestalt)
        gen = torch.Generator().manual_seed(3)  # random weights: no symmetric cancellation
        loss = (position * torch.randn(position.shape, generator=gen)).sum()
        for value in out.values():
            loss = loss + (value * torch.randn(value.shape, generator=gen)).mean()
        loss.backward()

    # At initialisation the last hypernetwork layers are zero: they get a gradient (so they can
    # start learning), while the layers before them get an exact zero gradient.
    backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for block in enc.modules():
        if isinstance(block, HyperConvNeXtBlock):
            assert block.hypernetwork[-1].weight.grad.abs().sum() > 0

    _perturb_hypernetworks(enc)
    backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hypernetwork_uses_gestalt_prior(tiny: LociSConfig) -> None:
    torch.manual_seed(0)
    enc = HyperConvNeXtEncoder(tiny).eval()
    x, prior = _inputs(tiny, 4)
    other = torch.rand(prior.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        # zero-initialised last layer: a plain ConvNeXt encoder, blind to the prior
        p0, g0 = enc(x, prior)
        p1, g1 = enc(x, other)
        torch.testing.assert_close(p0, p1)
        torch.testing.assert_close(g0, g1)
        _perturb_hypernetworks(enc)
        p0, g0 = enc(x, prior)
        p1, g1 = enc(x, other)
    assert (p0 - p1).abs().max() > 1e-4
    assert (g0 - g1).abs().max() > 1e-4


def test_hyper_block_matches_per_sample_conv() -> None:
    """The folded grouped conv equals running each sample with its own kernel."""
    torch.manual_seed(0)
    block = HyperConvNeXtBlock(8, 8, gestalt_dim=5, hyper_hidden=6, kernel_size=3)
    _perturb_hypernetworks(block, std=0.3)
    x, prior = torch.randn(3, 8, 5, 5), torch.rand(3, 5)
    out = block(x, prior)
    kernels = block.hypernetwork(prior).view(3, 8, 1, 3, 3) + block.depthwise.weight
    for i in range(3):
        dw = torch.nn.functional.conv2d(x[i:i + 1], kernels[i], block.depthwise.bias, padding=1, groups=8)
        torch.testing.assert_close(out[i:i + 1], block.residual(x[i:i + 1], dw))


def test_rows_are_independent(tiny: LociSConfig) -> None:
    torch.manual_seed(0)
    enc, dec = HyperConvNeXtEncoder(tiny).eval(), CascadedDecoder(tiny).eval()
    _perturb_hypernetworks(enc)
    x, prior = _inputs(tiny, 5)
    x2, prior2 = x.clone(), prior.clone()
    j = 2
    x2[j] = torch.randn_like(x2[j]) * 3
    prior2[j] = 1 - prior2[j]
    with torch.no_grad():
        p_a, g_a = enc(x, prior)
        p_b, g_b = enc(x2, prior2)
        out_a, out_b = dec(p_a, g_a), dec(p_b, g_b)
    keep = [i for i in range(5) if i != j]
    torch.testing.assert_close(p_a[keep], p_b[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(g_a[keep], g_b[keep], atol=1e-6, rtol=0)
    for key in out_a:
        torch.testing.assert_close(out_a[key][keep], out_b[key][keep], atol=1e-6, rtol=0)
    assert (p_a[j] - p_b[j]).abs().max() > 1e-4


def test_eval_deterministic_training_noisy(tiny: LociSConfig) -> None:
    torch.manual_seed(0)
    enc = HyperConvNeXtEncoder(tiny)
    x, prior = _inputs(tiny, 3)
    with torch.no_grad():
        enc.eval()
        p0, g0 = enc(x, prior)
        p1, g1 = enc(x, prior)
        torch.testing.assert_close(g0, g1, atol=0, rtol=0)
        torch.testing.assert_close(p0, p1, atol=0, rtol=0)
        enc.train()
        pt, gt1 = enc(x, prior)
        _, gt2 = enc(x, prior)
    assert (gt1 - gt2).abs().max() > 1e-3  # binarisation noise in training only
    torch.testing.assert_close(pt, p0)  # the position code carries no noise


def test_decode_mask_runs_only_the_mask_decoder(tiny: LociSConfig) -> None:
    dec = CascadedDecoder(tiny).eval()
    calls: list[str] = []
    for name in ("mask_decoder", "depth_decoder", "rgb_decoder"):
        getattr(dec, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    position = torch.tensor([[0.1, -0.2, 0.3, 0.0]])
    gestalt = torch.rand(1, tiny.gestalt_dim)
    with torch.no_grad():
        dec.decode_mask(position, gestalt)
    assert calls == ["mask_decoder"]


def test_float64(tiny: LociSConfig) -> None:
    enc, dec = HyperConvNeXtEncoder(tiny).double().eval(), CascadedDecoder(tiny).double().eval()
    x, prior = _inputs(tiny, 2)
    with torch.no_grad():
        position, gestalt = enc(x.double(), prior.double())
        out = dec(position, gestalt)
    assert position.dtype == gestalt.dtype == out["rgb"].dtype == torch.float64


# ---- composition ---------------------------------------------------------------------------------

def _compose_inputs(b: int = 2, k: int = 4, hw: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        mask_logits=torch.randn(b, k, 1, hw, hw, generator=gen) * 3,
        priority=torch.randn(b, k, generator=gen),
        presence=torch.ones(b, k),
        slot_rgb=torch.rand(b, k, 3, hw, hw, generator=gen),
        slot_depth=torch.rand(b, k, 1, hw, hw, generator=gen),
        background_rgb=torch.rand(b, 3, hw, hw, generator=gen),
        background_depth=torch.rand(b, 1, hw, hw, generator=gen),
    )


@pytest.mark.parametrize("temperature", [0.01, 0.1, 10.0])
def test_compose_masks_sum_to_one(temperature: float) -> None:
    args = _compose_inputs(k=6)
    out = compose(**args, temperature=temperature)
    assert out["masks"].shape == (2, 7, 8, 8) and out["object_masks"].shape == (2, 6, 8, 8)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, 8, 8))
    assert (out["masks"] >= 0).all()
    expected_rgb = (out["masks"][:, :6, None] * args["slot_rgb"]).sum(1) + out["masks"][:, 6:] * args["background_rgb"]
    torch.testing.assert_close(out["rgb"], expected_rgb)
    assert out["depth"].shape == (2, 1, 8, 8)


def test_compose_front_slot_occludes_back_slot(tiny: LociSConfig) -> None:
    hw = 8
    logits = torch.full((1, 2, 1, hw, hw), -20.0)
    logits[0, 0, 0, :, :5] = 20.0  # slot 0 covers columns 0-4
    logits[0, 1, 0, :, 3:] = 20.0  # slot 1 covers columns 3-7: overlap in columns 3-4
    args = _compose_inputs(b=1, k=2, hw=hw)
    args.update(mask_logits=logits, priority=torch.tensor([[2.0, 0.0]]))  # slot 0 in front
    dec = CascadedDecoder(tiny)
    masks = dec.compose(**args)["masks"]
    overlap = masks[0, :, :, 3:5]
    assert (overlap[0] > 0.99).all() and (overlap[1] < 0.01).all()
    assert (masks[0, 1, :, 5:] > 0.99).all()
    args["priority"] = torch.tensor([[0.0, 2.0]])  # swap the depth order
    masks = dec.compose(**args)["masks"]
    assert (masks[0, 1, :, 3:5] > 0.99).all() and (masks[0, 0, :, 3:5] < 0.01).all()


def test_compose_absent_slots_contribute_nothing() -> None:
    args = _compose_inputs(b=2, k=3)
    args["mask_logits"][:, 2] = 10.0  # slot 2 covers everything ...
    args["priority"][:, 2] = 100.0  # ... in front of everything, but is absent
    args["presence"] = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = compose(**args, temperature=0.1)
    assert out["masks"][0, 2].abs().max() == 0 and out["object_masks"][0, 2].abs().max() == 0
    # row 0 is as if slot 2 did not exist; row 1 is dominated by it
    reference = compose(**{k: (v[:1, :2] if k in ("mask_logits", "priority", "presence", "slot_rgb",
                                                   "slot_depth") else v[:1]) for k, v in args.items()},
                        temperature=0.1)
    torch.testing.assert_close(out["masks"][0, :2], reference["masks"][0, :2])
    torch.testing.assert_close(out["masks"][0, 3], reference["masks"][0, 2])
    assert (out["masks"][1, 2] > 0.99).all()


def test_compose_gradients_flow() -> None:
    args = _compose_inputs()
    args["mask_logits"].requires_grad_(True)
    args["priority"].requires_grad_(True)
    out = compose(**args, temperature=0.5)
    out["rgb"].sum().backward()
    assert torch.isfinite(args["mask_logits"].grad).all() and args["priority"].grad.abs().sum() > 0


# ---- scene-relative depth ------------------------------------------------------------------------

def test_scene_relative_depth_range_and_monotonicity() -> None:
    depth = torch.linspace(0.5, 20.0, 64).view(1, 1, 8, 8).repeat(3, 1, 1, 1)
    depth[1] *= 7.0  # a scene at another scale
    depth[2] = depth[2].flip(-1)
    d = scene_relative_depth(depth)
    assert d.shape == depth.shape and ((d > 0) & (d < 1)).all()
    flat = d[0].flatten()
    assert (flat[1:] < flat[:-1]).all()  # farther -> smaller (near ~ 1)
    torch.testing.assert_close(d[1], d[0])  # scene-relative: invariant to a global scale
    # per-image standardisation: a log-symmetric scene is centred on 0.5 (its geometric mean)
    symmetric = scene_relative_depth(torch.logspace(-1, 1, 16).view(1, 1, 4, 4))
    torch.testing.assert_close(symmetric.mean(), torch.tensor(0.5))
    torch.testing.assert_close(symmetric.flatten() + symmetric.flatten().flip(0), torch.ones(16))


def test_scene_relative_depth_invalid_pixels() -> None:
    depth = torch.rand(3, 1, 6, 6) * 5 + 0.5
    depth[0, 0, 0, :4] = torch.tensor([0.0, -1.0, float("nan"), float("inf")])
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[0, 0, 1, 0] = False
    depth[1] = 0.0  # no valid pixel at all
    depth[2] = 3.0  # a flat scene
    depth.requires_grad_(True)
    d = scene_relative_depth(depth, valid)
    assert torch.isfinite(d).all()
    assert (d[0, 0, 0, :4] == 0).all() and d[0, 0, 1, 0] == 0
    assert (d[1] == 0).all()
    torch.testing.assert_close(d[2], torch.full_like(d[2], 0.5))
    d.sum().backward()
    assert torch.isfinite(depth.grad).all()
    # the masked pixels must not change the statistics of the others
    clean = depth.detach().clone()
    clean[0, 0, 0, :4] = 123.0
    clean[0, 0, 1, 0] = 1e-3
    valid2 = valid.clone()
    valid2[0, 0, 0, :4] = False
    torch.testing.assert_close(scene_relative_depth(clean, valid2)[0], d[0].detach())


def test_scene_relative_depth_integer_input() -> None:
    d = scene_relative_depth(torch.tensor([[[[1000, 2000], [0, 4000]]]], dtype=torch.int32))
    assert d.dtype == torch.float32 and d[0, 0, 1, 0] == 0 and d[0, 0, 0, 0] > d[0, 0, 0, 1] > d[0, 0, 1, 1]


# ---- paper sizes (tables 4 and 6) ----------------------------------------------------------------

def test_paper_preset_widths() -> None:
    cfg = LociSConfig.preset("paper")
    enc, dec = HyperConvNeXtEncoder(cfg), CascadedDecoder(cfg)
    # table 4: Conv2D(C_in, 32, 4, 4), (32, 64, 2, 2), (64, 128, 2, 2); blocks 1 / 1 / 2
    assert [tuple(e.conv.weight.shape) for e in enc.embeddings] == [
        (32, cfg.encoder_in_channels, 4, 4), (64, 32, 2, 2), (128, 64, 2, 2)]
    assert [len(s) for s in enc.stages] == [1, 1, 2]
    assert len(enc.position_blocks) == 3 and enc.position_blocks[-1].project.out_channels == 4
    assert len(enc.gestalt_base) == 2
    for head in enc.gestalt_heads:  # Conv2D(128, 256, 2, 2) + 4 x HyperConvNext 256
        assert tuple(head.embedding.conv.weight.shape) == (256, 128, 2, 2) and len(head.blocks) == 4
        assert head.blocks[0].depthwise.weight.shape == (256, 1, 7, 7)
        assert head.blocks[0].hypernetwork[-1].out_features == 256 * 7 * 7
        assert head.to_code.out_features == 256
    # table 6, mask decoder: 256 -> 128 -> 64 -> 32 (3x3) -> 128 (1x1) -> ConvT 128 -> 1, k 16
    convs = [m for m in dec.mask_decoder.body if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [
        (128, 256, 3, 3), (64, 128, 3, 3), (32, 64, 3, 3), (128, 32, 1, 1)]
    assert tuple(dec.mask_decoder.upscale.weight.shape) == (128, 1, 16, 16)
    # depth decoder: mask encoder 1 -> 128 (k16) -> 32; fuse 304 -> 64; 3 ConvNeXt; 64 -> 256 -> ConvT 1
    depth = dec.depth_decoder
    assert tuple(depth.mask_encoder.net[0].weight.shape) == (128, 1, 16, 16)
    assert tuple(depth.mask_encoder.net[2].weight.shape) == (32, 128, 1, 1)
    assert tuple(depth.fuse.weight.shape) == (64, 304, 1, 1) and len(depth.blocks) == 3
    assert tuple(depth.head[0].weight.shape) == (256, 64, 1, 1)
    assert tuple(depth.head[2].weight.shape) == (256, 1, 16, 16)
    # RGB decoder: depth encoder 1 -> 256 -> 64; fuse 368 -> 128; 5 ConvNeXt; 128 -> 512 -> ConvT 3, k 16
    rgb = dec.rgb_decoder
    assert tuple(rgb.depth_encoder.net[0].weight.shape) == (256, 1, 16, 16)
    assert tuple(rgb.depth_encoder.net[2].weight.shape) == (64, 256, 1, 1)
    assert tuple(rgb.fuse.weight.shape) == (128, 368, 1, 1) and len(rgb.blocks) == 5
    assert all(b.depthwise.in_channels == 128 for b in rgb.blocks)
    assert tuple(rgb.head[0].weight.shape) == (512, 128, 1, 1)
    assert tuple(rgb.head[2].weight.shape) == (512, 3, 16, 16)
    # shape-only forward at batch 1 (fast: ~0.1 s on CPU)
    enc.eval()
    dec.eval()
    x, prior = _inputs(cfg, 1)
    with torch.no_grad():
        position, gestalt = enc(x, prior)
        out = dec(position, gestalt)
    assert position.shape == (1, 4) and gestalt.shape == (1, 768)
    assert out["rgb"].shape == (1, 3, 256, 256) and out["mask_logits"].shape == (1, 1, 256, 256)


@pytest.mark.parametrize("in_channels,out_channels,stride,bias", [(128, 3, 4, True), (32, 1, 4, True),
                                                                  (12, 4, 2, False), (8, 8, 8, True)])
def test_patch_conv_transpose_equals_the_transposed_convolution(in_channels, out_channels, stride, bias):
    import torch.nn.functional as F

    from locis_rl.model.blocks import PatchConvTranspose2d

    torch.manual_seed(0)
    layer = PatchConvTranspose2d(in_channels, out_channels, stride, bias=bias)
    reference = nn.ConvTranspose2d(in_channels, out_channels, stride, stride=stride, bias=bias)
    assert set(layer.state_dict()) == set(reference.state_dict())  # checkpoints load unchanged
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, in_channels, 5, 7, requires_grad=True)
    out = layer(x)
    expected = F.conv_transpose2d(x, reference.weight, reference.bias, stride=stride)
    assert out.shape == (3, out_channels, 5 * stride, 7 * stride)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.weight), grad)
    rx, rw = torch.autograd.grad(expected, (x, reference.weight), grad)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


def test_gaussian_heatmap_has_no_subnormal_tail() -> None:
    """Small Gaussians: the exact values where they are not negligible, exact zeros in the tail.

    Subnormal floats (below ``finfo.tiny``) send every CPU multiply-add that reads them down a slow
    path; the decoder reads Gestalt x heatmap, so the tail must hold none.
    """
    from locis_rl.model.blocks import coordinate_grid, gaussian_heatmap

    on_pixel = coordinate_grid(64, 64)[0, 0, 32].item()  # x of pixel column 32
    position = torch.tensor([[on_pixel, on_pixel, 0.02, 0.0], [0.9, -0.5, 0.05, 1.0],
                             [-1.5, 2.0, 0.1, 0.0], [0.3, 0.3, 1e-4, 0.0]])
    heat = gaussian_heatmap(position, 64, 64)
    tiny = torch.finfo(heat.dtype).tiny
    assert not ((heat > 0) & (heat < tiny)).any()
    grid = coordinate_grid(64, 64, dtype=torch.float64)
    pos = position.double()
    dist2 = (grid[0] - pos[:, 0, None, None]) ** 2 + (grid[1] - pos[:, 1, None, None]) ** 2
    exact = torch.exp(-0.5 * dist2 / pos[:, 2, None, None].clamp_min(1e-3) ** 2)
    kept = exact >= 1e-21
    assert kept.any(dim=(1, 2))[:2].all() and (~kept).any()  # both regimes are exercised
    torch.testing.assert_close(heat[kept].double(), exact[kept], rtol=1e-3, atol=0)  # float32 grid and exponent
    assert (heat[exact < 1e-22] == 0).all()
    assert heat[0, 32, 32] == 1.0 and heat.max() <= 1.0
    # Before the cut-off these small Gaussians filled much of the grid with subnormals.
    assert ((exact > 0) & (exact < tiny)).any()
