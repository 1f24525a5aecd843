"""SAVi baseline: shapes per conditioning mode, gradients, row independence, resets, checkpoints,
ground-truth conditioning, and a tiny overfitting run."""
from __future__ import annotations

import pytest
import torch

from locis_rl.model.config import ConfigError
from locis_rl.savi import CONDITIONING_MODES, CheckpointError, SAVi, SAViConfig, boxes_from_segmentation

B = 2
S = 64
K = 6  # savi-tiny


def _model(conditioning: str = "unconditional-learned", **changes) -> SAVi:
    return SAVi(SAViConfig.preset("tiny").replace(conditioning=conditioning, **changes))


def _micro(conditioning: str = "unconditional-learned", **changes) -> SAVi:
    """An even smaller variant (32x32, narrow) for the optimisation tests."""
    cfg = SAViConfig.preset("tiny").replace(
        image_size=32, num_slots=3, slot_dim=32, conditioning=conditioning,
        encoder={"channels": [16, 16], "strides": [1, 1], "mlp_hidden": 32, "feature_dim": 32},
        corrector={"mlp_hidden": 64}, predictor={"heads": 2, "mlp_hidden": 64},
        decoder={"broadcast_size": 8, "channels": [16, 16], "strides": [2, 2], "kernel_size": 3},
        initializer={"hidden": 32}, **changes)
    return SAVi(cfg)


def _conditioning(mode: str, b: int = B, m: int = 3) -> dict | None:
    if mode == "boxes":
        y0x0 = torch.rand(b, m, 2) * 0.5
        return {"boxes": torch.cat([y0x0, y0x0 + 0.3], dim=-1), "valid": torch.ones(b, m, dtype=torch.bool)}
    if mode == "centers":
        return {"centers": torch.rand(b, m, 2)}
    return None


def _frames(t: int, b: int = B, s: int = S, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, b, 3, s, s, generator=g), 1.0 + 4.0 * torch.rand(t, b, 1, s, s, generator=g)


# ---- config ---------------------------------------------------------------------------------------
def test_presets_and_config_round_trip():
    tiny, small = SAViConfig.preset("tiny"), SAViConfig.preset("small")
    assert (tiny.num_slots, tiny.slot_dim, tiny.image_size) == (6, 64, 64)
    assert small == SAViConfig() and small.slot_dim == 128 and small.feature_size == 64
    assert SAViConfig.from_dict(tiny.to_dict()) == tiny
    with pytest.raises(ConfigError, match="available"):
        SAViConfig.preset("nope")
    with pytest.raises(ConfigError, match="conditioning"):
        tiny.replace(conditioning="segmentation")
    with pytest.raises(ConfigError, match="broadcast_size"):
        tiny.replace(image_size=128)


# ---- shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_depth", [False, True], ids=["rgb", "rgbd"])
@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_step_shapes(mode, with_depth):
    model = _model(mode, use_depth=with_depth, predict_depth=with_depth).eval()
    rgb, depth = _frames(2)
    state = model.init_state(B, seed=0)
    d = model.config.slot_dim
    fs = model.config.feature_size
    with torch.no_grad():
        for t in range(2):
            out, state = model.step(rgb[t], depth[t] if with_depth else None, state,
                                    conditioning=_conditioning(mode) if t == 0 else None)
    expected = {"position": (B, K, 4), "gestalt": (B, K, d), "presence": (B, K), "masks": (B, K + 1, S, S),
                "object_masks": (B, K, S, S), "mask_logits": (B, K, S, S), "slot_depth": (B, K, 1),
                "rgb": (B, 3, S, S), "slot_rgb": (B, K, 3, S, S), "attention": (B, K, fs, fs),
                "next_gestalt": (B, K, d)}
    if with_depth:
        expected.update({"depth": (B, 1, S, S), "slot_depth_map": (B, K, 1, S, S), "scene_depth": (B, 1, S, S)})
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert torch.allclose(out["masks"].sum(1), torch.ones(B, S, S), atol=1e-5)
    assert (out["masks"][:, K] == 0).all()  # background channel: all zero, last
    assert out["position"][..., :2].abs().max() <= 1.0 and (out["position"][..., 3] == 0).all()
    assert set(out["presence"].unique().tolist()) <= {0.0, 1.0}
    assert (0 <= out["rgb"]).all() and (out["rgb"] <= 1).all()
    assert set(state.keys()) == {"slots", "initialized", "frame_index", "rng_seed"}
    assert state["initialized"].all() and (state["frame_index"] == 2).all()
    for value in out.values():
        assert torch.isfinite(value).all()


def test_slot_depth_from_input_depth_without_prediction():
    model = _model().eval()
    depth = torch.full((B, 1, S, S), 2.0)
    depth[:, :, : S // 2] = 8.0  # far top half, near bottom half
    with torch.no_grad():
        out, _ = model.step(torch.rand(B, 3, S, S), depth)
    assert "depth" not in out.keys()
    assert ((out["slot_depth"] > 0) & (out["slot_depth"] < 1)).all()


# ---- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_gradients_reach_every_parameter(mode):
    model = _model(mode, use_depth=True, predict_depth=True).train()
    rgb, depth = _frames(3)
    state = model.init_state(B, seed=1)
    total = 0.0
    for t in range(3):
        out, state = model.step(rgb[t], depth[t], state, conditioning=_conditioning(mode))
        losses = model.loss(out, rgb[t], depth[t])
        assert set(losses) == {"total", "rgb", "depth"} and losses["depth"] > 0
        total = total + losses["total"]
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


# ---- row independence / resets ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["unconditional-sampled", "boxes"])
def test_rows_are_independent(mode):
    model = _model(mode, use_depth=True, predict_depth=True).eval()
    rgb, depth = _frames(2, b=3, seed=3)
    cond = _conditioning(mode, b=3)
    seeds = torch.tensor([11, 22, 33])

    def run(rows):
        rows_t = torch.tensor(rows)
        c = None if cond is None else {key: v[rows_t] for key, v in cond.items()}
        state = model.init_state(len(rows), seed=seeds[rows_t])
        with torch.no_grad():
            for t in range(2):
                out, state = model.step(rgb[t][rows_t], depth[t][rows_t], state, conditioning=c)
        return out

    full, alone = run([0, 1, 2]), run([1])
    other = run([2, 1])  # row 1 next to a different row, at another index
    for key in full.keys():
        torch.testing.assert_close(full[key][1:2], alone[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(other[key][1:2], alone[key], atol=1e-5, rtol=0)


def test_sampled_init_differs_between_rows_and_follows_seed():
    model = _model("unconditional-sampled").eval()
    state = model.init_state(3, seed=0)
    slots = model.initial_slots(state)
    assert not torch.allclose(slots[0], slots[1])
    torch.testing.assert_close(model.initial_slots(model.init_state(3, seed=0)), slots)
    assert not torch.allclose(model.initial_slots(model.init_state(3, seed=1)), slots)


def test_reset_state_isolation():
    model = _model("unconditional-sampled").eval()
    rgb, _ = _frames(3)
    state = model.init_state(B, seed=5)
    with torch.no_grad():
        for t in range(2):
            _, state = model.step(rgb[t], state=state)
        mask = torch.tensor([True, False])
        reset = model.reset_state(state, mask)
        assert reset is not state and state["initialized"].all()  # input not modified
        assert not reset["initialized"][0] and reset["initialized"][1]
        assert reset["frame_index"].tolist() == [0, 2]
        assert reset["rng_seed"][0] != state["rng_seed"][0] and reset["rng_seed"][1] == state["rng_seed"][1]
        assert torch.equal(reset["slots"][1], state["slots"][1]) and (reset["slots"][0] == 0).all()
        out_kept, _ = model.step(rgb[2], state=state)
        out_reset, _ = model.step(rgb[2], state=reset)
        fresh_state = model.init_state(1, seed=reset["rng_seed"][:1])
        out_fresh, _ = model.step(rgb[2][:1], state=fresh_state)
    for key in out_kept.keys():  # row 1 unaffected; row 0 behaves as a brand-new episode
        torch.testing.assert_close(out_reset[key][1], out_kept[key][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out_reset[key][:1], out_fresh[key], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mask"):
        model.reset_state(state, torch.tensor([1, 0]))
    detached = model.detach_state(state)
    assert not detached["slots"].requires_grad


# ---- checkpoints ------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = _model("boxes", predict_depth=True).eval()
    path = model.save_pretrained(tmp_path / "savi.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["savi.pt"]  # no temporary file left behind
    loaded = SAVi.from_pretrained(path).eval()
    assert loaded.config == model.config
    rgb, _ = _frames(1)
    cond = _conditioning("boxes")
    with torch.no_grad():
        a, _ = model.step(rgb[0], conditioning=cond)
        b, _ = loaded.step(rgb[0], conditioning=cond)
    for key in a.keys():
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    payload = torch.load(path, weights_only=True)
    assert (payload["format"], payload["format_version"], payload["model"]) == ("locis-rl-checkpoint", 1, "SAVi")
    with pytest.raises(CheckpointError, match="config.num_slots"):
        SAVi.from_pretrained(path, config=model.config.replace(num_slots=4))
    payload["model"] = "LociS"
    torch.save(payload, tmp_path / "locis.pt")
    with pytest.raises(CheckpointError, match="expected 'SAVi'"):
        SAVi.from_pretrained(tmp_path / "locis.pt")
    payload["model"] = "SAVi"
    payload["state_dict"]["init_mlp.0.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="init_mlp.0.weight"):
        SAVi.from_pretrained(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a locis-rl checkpoint"):
        SAVi.from_pretrained(tmp_path / "junk.pt")


# ---- ground-truth conditioning ----------------------------------------------------------------------
def test_boxes_from_segmentation_known_case():
    seg = torch.zeros(2, 8, 8, dtype=torch.int64)
    seg[0, 1:3, 2:6] = 3  # rows 1-2, cols 2-5 (8 px)
    seg[0, 5, 0] = 1  # a single pixel
    seg[0, 6:8, 6:8] = 7  # 4 px
    seg[1, 0:4, 0:4] = 2  # row 1: one object
    boxes, centers, valid = boxes_from_segmentation(seg, 2)
    # row 0: three objects for K=2 -> the two largest (ids 3, 7), ordered by id
    assert valid.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(boxes[0, 0], torch.tensor([1 / 8, 2 / 8, 3 / 8, 6 / 8]))
    torch.testing.assert_close(boxes[0, 1], torch.tensor([6 / 8, 6 / 8, 1.0, 1.0]))
    torch.testing.assert_close(centers[0, 0], torch.tensor([2.0 / 8, 4.0 / 8]))
    torch.testing.assert_close(centers[0, 1], torch.tensor([7.0 / 8, 7.0 / 8]))
    torch.testing.assert_close(boxes[1, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert (boxes[1, 1] == -1).all() and (centers[1, 1] == -1).all()
    boxes4, _, valid4 = boxes_from_segmentation(seg, 4)  # K larger than the objects: -1 padding
    assert boxes4.shape == (2, 4, 4) and valid4.sum().item() == 4
    torch.testing.assert_close(boxes4[0, 0], torch.tensor([5 / 8, 0.0, 6 / 8, 1 / 8]))  # id 1 first


def test_conditional_mode_needs_conditioning():
    model = _model("boxes").eval()
    rgb, _ = _frames(2)
    with pytest.raises(ValueError, match=r"boxes_from_segmentation"):
        model.step(rgb[0])
    with pytest.raises(ValueError, match=r"'centers'"):
        _model("centers").step(rgb[0], conditioning={"boxes": torch.rand(B, 2, 4)})
    with pytest.raises(ValueError, match="shape"):
        model.step(rgb[0], conditioning={"boxes": torch.rand(B, K + 1, 4)})
    with pytest.raises(ValueError, match="mode"):
        model.step(rgb[0], conditioning=_conditioning("boxes"), mode="centers")
    seg = torch.zeros(B, S, S, dtype=torch.int64)
    seg[:, 10:20, 30:50] = 1
    boxes, _, valid = boxes_from_segmentation(seg, K)
    with torch.no_grad():
        _, state = model.step(rgb[0], conditioning={"boxes": boxes, "valid": valid})
        model.step(rgb[1], state=state)  # later frames need none


# ---- optimisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["unconditional-learned", "centers"])
def test_adam_reduces_loss_on_a_fixed_clip(mode):
    torch.manual_seed(0)
    model = _micro(mode).train()
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(2, 2, 3, 1, 1, generator=g).expand(2, 2, 3, 32, 32).clone()
    clip[:, :, :, 8:20, 8:20] = torch.tensor([1.0, 0.2, 0.1])[:, None, None]  # a red square
    cond = {"centers": torch.tensor([[[14 / 32, 14 / 32]]] * 2)}
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)

    def clip_loss() -> torch.Tensor:
        state = model.init_state(2, seed=0)
        total = 0.0
        for t in range(2):
            out, state = model.step(clip[t], state=state, conditioning=cond)
            total = total + model.loss(out, clip[t])["total"]
        return total / 2

    losses = []
    for _ in range(40):
        optimiser.zero_grad()
        loss = clip_loss()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # ~0.077 -> ~0.032 here
