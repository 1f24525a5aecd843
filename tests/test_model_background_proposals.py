"""Background module (section 3.4) and proposal network (section 3.6) on the tiny preset."""
from __future__ import annotations

import pytest
import torch

from locis_rl.model.background import (BackgroundExtractor, BackgroundModule, UncertaintyNet,
                                       background_reconstruction_loss, median_background_foreground,
                                       uncertainty_loss)
from locis_rl.model.config import LociSConfig
from locis_rl.model.proposals import ProposalNet, proposal_loss, relabel_segmentation


@pytest.fixture(scope="module")
def tiny() -> LociSConfig:
    return LociSConfig.preset("tiny")


def _squares(batch: int, size: int) -> torch.Tensor:
    """``[B,H,W]`` int64 segmentation with 2-3 non-overlapping squares of arbitrary ids."""
    seg = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        seg[b, 4:20, 4:20] = 17 + b
        seg[b, 36:56, 8:24] = 1000
        if b % 2 == 0:
            seg[b, 30:46, 40:58] = 3
    return seg


def _image_from(seg: torch.Tensor, channels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    img = torch.full((seg.shape[0], channels, *seg.shape[1:]), 0.2)
    for value in seg.unique():
        if value == 0:
            continue
        colour = torch.rand(channels, generator=g)
        img = torch.where((seg == value)[:, None], colour[None, :, None, None], img)
    return img


def _missing_grads(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("use_depth", [False, True])
def test_background_shapes(tiny, use_depth):
    cfg = tiny.replace(use_depth=use_depth)
    module = BackgroundModule(cfg)
    image = torch.rand(2, cfg.image_channels, cfg.image_size, cfg.image_size)
    out = module(image)
    s = cfg.image_size
    assert out["foreground_logits"].shape == (2, 1, s, s)
    assert out["foreground"].shape == (2, 1, s, s)
    assert out["rgb"].shape == (2, 3, s, s)
    assert out["depth"].shape == (2, 1, s, s)
    assert out["depth_code"].shape == (2, cfg.background.depth_bottleneck)
    assert module.extractor.depth_bottleneck == cfg.background.depth_bottleneck
    assert ((out["rgb"] >= 0) & (out["rgb"] <= 1)).all() and ((out["depth"] >= 0) & (out["depth"] <= 1)).all()
    assert UncertaintyNet(cfg)(image).shape == (2, 1, s, s)


@pytest.mark.parametrize("use_depth", [False, True])
def test_proposal_shapes(tiny, use_depth):
    cfg = tiny.replace(use_depth=use_depth)
    net = ProposalNet(cfg)
    q, s = cfg.proposals.max_instances, cfg.image_size
    out = net(torch.rand(2, cfg.image_channels, s, s))
    assert out["instance_logits"].shape == (2, q, s, s)
    assert out["background_logits"].shape == (2, 1, s, s)
    assert out["scores"].shape == (2, q)
    assert out["prototypes"].shape == (2, cfg.proposals.num_prototypes, s, s)


def test_background_gradients_reach_every_parameter(tiny):
    cfg = tiny.replace(use_depth=True)
    module = BackgroundModule(cfg).train()
    seg = _squares(2, cfg.image_size)
    image = _image_from(seg, cfg.image_channels)
    fg_target = (seg > 0).float()[:, None]
    out = module(image)
    loss = uncertainty_loss(out["foreground_logits"], fg_target, pos_weight=2.0)
    loss = loss + background_reconstruction_loss(out["rgb"], out["depth"], image[:, :3], image[:, 3:], fg_target)
    # teacher-forced mask (some tokens masked, most kept) on RGB-only targets: together with the
    # predicted-mask pass, every parameter (mask token included) must receive a gradient
    forced = module(image, foreground_mask=fg_target)
    assert not forced["token_keep"].all() and forced["token_keep"].float().mean() > 0.5
    loss = loss + background_reconstruction_loss(forced["rgb"], forced["depth"], image[:, :3], None, fg_target)
    loss.backward()
    assert torch.isfinite(loss)
    assert _missing_grads(module) == []


def test_proposal_gradients_reach_every_parameter(tiny):
    net = ProposalNet(tiny)
    seg = _squares(2, tiny.image_size)
    losses = proposal_loss(net(_image_from(seg, tiny.image_channels)), seg)
    assert set(losses) == {"loss", "ce", "score"}
    losses["loss"].backward()
    assert _missing_grads(net) == []


def _assert_rows_independent(fn, x: torch.Tensor) -> None:
    with torch.no_grad():
        full = fn(x)
        alone = fn(x[:1])
        changed = x.clone()
        changed[1:] = torch.rand_like(changed[1:])
        other = fn(changed)
    for key, value in alone.items():
        torch.testing.assert_close(full[key][:1], value, atol=1e-6, rtol=0, msg=key)
        torch.testing.assert_close(other[key][:1], value, atol=1e-6, rtol=0, msg=key)


def test_row_independence(tiny):
    torch.manual_seed(0)
    x = torch.rand(3, tiny.image_channels, tiny.image_size, tiny.image_size)
    background = BackgroundModule(tiny).eval()
    _assert_rows_independent(background, x)
    net = ProposalNet(tiny).eval()
    _assert_rows_independent(net, x)


def test_fully_foreground_input_is_finite(tiny):
    extractor = BackgroundExtractor(tiny)
    image = torch.rand(2, tiny.image_channels, tiny.image_size, tiny.image_size)
    ones = torch.ones(2, 1, tiny.image_size, tiny.image_size)
    for mode in (extractor.train(), extractor.eval()):
        out = mode(image, ones)
        assert out["token_keep"].sum(1).min() >= 1
        assert all(torch.isfinite(v.float()).all() for v in out.values())
    module = BackgroundModule(tiny)
    out = module(image, foreground_mask=ones)
    loss = background_reconstruction_loss(out["rgb"], out["depth"], image, None, ones)
    assert torch.isfinite(loss)


def test_masking_follows_threshold(tiny):
    extractor = BackgroundExtractor(tiny)
    p, s = tiny.background.vit_patch, tiny.image_size
    fg = torch.zeros(1, 1, s, s)
    fg[..., :p, :p] = 1.0  # exactly token 0 is foreground
    keep = extractor.token_keep(fg)
    assert not keep[0, 0] and keep[0, 1:].all()


def test_bottleneck_binarisation_train_vs_eval(tiny):
    extractor = BackgroundExtractor(tiny)
    image = torch.rand(1, tiny.image_channels, tiny.image_size, tiny.image_size)
    fg = torch.zeros(1, 1, tiny.image_size, tiny.image_size)
    extractor.eval()
    a, b = extractor(image, fg)["depth_code"], extractor(image, fg)["depth_code"]
    torch.testing.assert_close(a, b)
    extractor.train()
    torch.manual_seed(1)
    assert not torch.allclose(extractor(image, fg)["depth_code"], a)


def test_median_background_finds_moving_square():
    t, s = 7, 32
    frames = torch.full((t, 3, s, s), 0.3)
    frames[:, 1] = 0.6
    for i in range(t):
        frames[i, :, 8:14, 2 + 4 * i: 8 + 4 * i] = 0.9
    fg = median_background_foreground(frames, threshold=0.1)
    assert fg.shape == (t, 1, s, s)
    truth = torch.zeros(t, 1, s, s)
    for i in range(t):
        truth[i, :, 8:14, 2 + 4 * i: 8 + 4 * i] = 1.0
    assert torch.equal(fg, truth)
    batched = median_background_foreground(torch.stack([frames, frames.flip(0)]))
    assert batched.shape == (2, t, 1, s, s)
    assert torch.equal(batched[1], truth.flip(0))


def test_relabel_segmentation_vectorised():
    seg = torch.tensor([[[0, 5, 5], [9, 9, 0]], [[0, 0, 0], [0, 0, 0]], [[123456789, 2, 0], [2, 0, 0]]])
    labels, counts = relabel_segmentation(seg)
    assert counts.tolist() == [2, 0, 2]
    assert labels.tolist() == [[[0, 1, 1], [2, 2, 0]], [[0, 0, 0], [0, 0, 0]], [[2, 1, 0], [1, 0, 0]]]


def test_proposal_loss_tensor_form_and_empty_rows(tiny):
    net = ProposalNet(tiny)
    seg = torch.zeros(2, tiny.image_size, tiny.image_size, dtype=torch.long)
    seg[1, :10, :10] = 4
    out = net(torch.rand(2, tiny.image_channels, tiny.image_size, tiny.image_size))
    losses = proposal_loss(out["instance_logits"], out["scores"], seg,
                           background_logits=out["background_logits"])
    reference = proposal_loss(out, seg)
    torch.testing.assert_close(losses["loss"], reference["loss"], atol=1e-4, rtol=1e-4)
    # more objects than instances: extra objects are ignored, loss stays finite
    many = torch.arange(tiny.image_size * tiny.image_size).view(1, tiny.image_size, tiny.image_size) % 20 + 1
    assert torch.isfinite(proposal_loss(net(torch.rand(1, tiny.image_channels, tiny.image_size, tiny.image_size)),
                                        many)["loss"])


def test_proposal_training_reduces_loss(tiny):
    torch.manual_seed(0)
    net = ProposalNet(tiny)
    seg = torch.zeros(1, tiny.image_size, tiny.image_size, dtype=torch.long)
    seg[0, 6:26, 6:26] = 11
    seg[0, 34:58, 30:54] = 4
    image = _image_from(seg, tiny.image_channels)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = None
    for _ in range(40):
        loss = proposal_loss(net(image), seg)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        first = loss.item() if first is None else first
    final = proposal_loss(net(image), seg)
    assert final["loss"].item() < 0.3 * first
    pred = net.predict_instances(image, score_threshold=0.5, min_pixels=8)
    assert pred["masks"].shape == (1, tiny.proposals.max_instances, tiny.image_size, tiny.image_size)
    assert int(pred["valid"].sum()) <= tiny.proposals.max_instances
    # the two squares are found: each is mostly covered by one valid instance
    masks = pred["masks"][0][pred["valid"][0]]
    for value in (11, 4):
        obj = (seg[0] == value).float()
        best_iou = ((masks * obj).sum((1, 2)) / ((masks + obj) > 0).float().sum((1, 2))).max()
        assert best_iou > 0.5


def test_predict_instances_bounds(tiny):
    net = ProposalNet(tiny)
    image = torch.rand(3, tiny.image_channels, tiny.image_size, tiny.image_size)
    pred = net.predict_instances(image)
    q = tiny.proposals.max_instances
    assert pred["masks"].shape == (3, q, tiny.image_size, tiny.image_size)
    assert pred["valid"].dtype == torch.bool and pred["valid"].shape == (3, q)
    assert (pred["valid"].sum(1) <= q).all()
    assert (pred["masks"].sum(1) <= 1).all()  # disjoint
    assert (pred["masks"].flatten(2).sum(-1)[~pred["valid"]] == 0).all()
    none = net.predict_instances(image, score_threshold=1.1)
    assert not none["valid"].any() and none["masks"].sum() == 0


def test_masked_patch_content_does_not_leak(tiny):
    extractor = BackgroundExtractor(tiny).eval()
    p, s = tiny.background.vit_patch, tiny.image_size
    image = torch.rand(1, tiny.image_channels, s, s)
    fg = torch.zeros(1, 1, s, s)
    fg[..., p:3 * p, p:3 * p] = 0.5  # above the threshold: 4 masked tokens, half-transparent input
    changed = image.clone()
    changed[..., p:3 * p, p:3 * p] = torch.rand(1, tiny.image_channels, 2 * p, 2 * p)
    with torch.no_grad():
        a, b = extractor(image, fg), extractor(changed, fg)
    assert int((~a["token_keep"]).sum()) == 4
    for key in ("rgb", "depth", "depth_code"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    # the background depth is a function of the bottleneck code only
    torch.testing.assert_close(extractor.decode_depth(a["depth_code"]), a["depth"])


@pytest.mark.parametrize("dtype", [torch.float64])
def test_dtype_agnostic(tiny, dtype):
    image = torch.rand(1, tiny.image_channels, tiny.image_size, tiny.image_size, dtype=dtype)
    assert BackgroundModule(tiny).to(dtype)(image)["rgb"].dtype == dtype
    net = ProposalNet(tiny).to(dtype)
    out = net(image)
    assert out["instance_logits"].dtype == dtype
    assert torch.isfinite(proposal_loss(out, _squares(1, tiny.image_size))["loss"])
