"""Tests of the assembled Loci-s model (`locis_rl.model.locis`): shapes, gradients, row
independence, partial resets, truncated BPTT, checkpoints, paper sizes, warm-up counts, input
validation. Tiny preset (with fewer warm-up passes where the count does not matter) keeps CPU CI fast.
"""
from __future__ import annotations

import pytest
import torch

from locis_rl.model import INFERENCE_OVERRIDE_KEYS, CheckpointError, ConfigError, LociS, LociSConfig
from locis_rl.model.background import background_reconstruction_loss, uncertainty_loss
from locis_rl.model.locis import FORMAT_VERSION, row_uniform
from locis_rl.model.proposals import proposal_loss

MODES = ("rnd", "reg", "seg")
FAST = {"assignment": {"warmup_train": 1, "warmup_inference": 1}}


def fast_config(preset: str = "tiny", **changes) -> LociSConfig:
    return LociSConfig.preset(preset).replace(**FAST).replace(**changes)


def frames(batch: int, size: int, seed: int = 0, depth: bool = False):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(batch, 3, size, size, generator=g)
    d = 0.5 + 4 * torch.rand(batch, 1, size, size, generator=g) if depth else None
    return rgb, d


def expected_shapes(cfg: LociSConfig, b: int) -> dict[str, tuple[int, ...]]:
    k, g, s = cfg.num_slots, cfg.gestalt_dim, cfg.image_size
    return {
        "position": (b, k, 4), "gestalt": (b, k, g), "presence": (b, k), "masks": (b, k + 1, s, s),
        "object_masks": (b, k, s, s), "slot_depth": (b, k, 1), "slot_depth_map": (b, k, 1, s, s),
        "slot_rgb": (b, k, 3, s, s), "rgb": (b, 3, s, s), "depth": (b, 1, s, s),
        "background_rgb": (b, 3, s, s), "background_depth": (b, 1, s, s), "foreground": (b, 1, s, s),
        "gate": (b, k, 2), "next_position": (b, k, 4), "next_gestalt": (b, k, g),
        "next_masks": (b, k + 1, s, s), "next_rgb": (b, 3, s, s), "l0": (b,),
    }


def state_shapes(model: LociS, b: int) -> dict[str, tuple[int, ...]]:
    cfg = model.config
    k, g, s = cfg.num_slots, cfg.gestalt_dim, cfg.image_size
    return {
        "position": (b, k, 4), "gestalt": (b, k, g), "last_position": (b, k, 4),
        "hidden": (b, k, cfg.transition.layers, cfg.transition.hidden), "presence": (b, k),
        "slot_rgb": (b, k, 3, s, s), "slot_depth": (b, k, 1, s, s), "object_masks": (b, k, s, s),
        "visible_masks": (b, k + 1, s, s), "predicted_rgb": (b, 3, s, s), "initialized": (b,),
        "frame_index": (b,), "rng_seed": (b,),
    }


@pytest.fixture(scope="module")
def tiny_model() -> LociS:
    torch.manual_seed(0)
    return LociS(fast_config()).eval()


# ---- shapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_depth", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset,batch,steps", [("tiny", 2, 2), ("small", 1, 1)])
def test_output_and_state_shapes(preset, batch, steps, mode, use_depth):
    torch.manual_seed(0)
    model = LociS(fast_config(preset, use_depth=use_depth)).eval()
    cfg = model.config
    state = model.init_state(batch, seed=1)
    with torch.no_grad():
        for t in range(steps):
            rgb, depth = frames(batch, cfg.image_size, seed=t, depth=use_depth)
            out, state = model.step(rgb, depth, state, mode=mode)
    for key, shape in expected_shapes(cfg, batch).items():
        assert tuple(out[key].shape) == shape, key
        assert torch.isfinite(out[key]).all(), key
    for key, shape in state_shapes(model, batch).items():
        assert tuple(state[key].shape) == shape, key
    assert state["initialized"].all() and (state["frame_index"] == steps).all()
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(batch, cfg.image_size, cfg.image_size))
    assert ((out["presence"] == 0) | (out["presence"] == 1)).all()
    assert out.batch_size == torch.Size([batch]) and state.batch_size == torch.Size([batch])


# ---- gradients ----------------------------------------------------------------------------------
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = LociS(fast_config(use_depth=True)).train()
    cfg = model.config
    b, s = 2, cfg.image_size
    seq = [frames(b, s, seed=t, depth=True) for t in range(4)]
    state = model.init_state(b, seed=0)
    total = torch.zeros(())
    for t in range(3):
        out, state = model.step(*seq[t], state, mode="rnd")
        total = total + model.loss(out, seq[t][0], seq[t][1], seq[t + 1][0], seq[t + 1][1])["total"]
    # background module: its own losses (uncertainty BCE + masked reconstruction)
    image = torch.cat([seq[0][0], out["scene_depth"].detach()], dim=1)
    target_fg = (torch.rand(b, 1, s, s) > 0.7).float()
    bg = model.background(image)
    total = total + uncertainty_loss(bg["foreground_logits"], target_fg)
    total = total + background_reconstruction_loss(bg["rgb"], bg["depth"], seq[0][0],
                                                   out["scene_depth"].detach(), target_fg)
    # proposal network: Hungarian instance loss
    seg = torch.zeros(b, s, s, dtype=torch.long)
    seg[:, 8:24, 8:24] = 1
    seg[:, 40:56, 30:60] = 2
    total = total + proposal_loss(model.proposals(image), seg)["loss"]
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nonfinite, f"non-finite gradients: {nonfinite}"
    # The hypernetworks' zero-initialised output layers (encoder.py) block the gradient of their first
    # layer at initialisation, by design; every other parameter must get a non-zero gradient.
    zero = [n for n, p in model.named_parameters()
            if p.grad is not None and not p.grad.any() and "hypernetwork.0." not in n]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


# ---- row independence -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_rows_independent_with_per_row_randomness(tiny_model, mode):
    model = tiny_model
    s, b = model.config.image_size, 3
    seq = [frames(b, s, seed=10 + t)[0] for t in range(3)]
    state = model.init_state(b, seed=123)
    with torch.no_grad():
        outs = []
        for t in range(3):
            out, state = model.step(seq[t], None, state, mode=mode)
            outs.append(out)
        for i in range(b):
            alone = model.init_state(b, seed=123)[i:i + 1]
            for t in range(3):
                out_i, alone = model.step(seq[t][i:i + 1], None, alone, mode=mode)
                for key in out_i.keys():
                    torch.testing.assert_close(out_i[key], outs[t][key][i:i + 1], atol=1e-5, rtol=1e-5,
                                               msg=lambda m: f"row {i}, frame {t}, key {key}: {m}")


def test_skipping_the_current_rgb_reconstruction_changes_nothing_else(tiny_model):
    model = tiny_model
    s, b = model.config.image_size, 2
    seq = [frames(b, s, seed=20 + t)[0] for t in range(3)]
    full, lean = model.init_state(b, seed=7), model.init_state(b, seed=7)
    with torch.no_grad():
        for t in range(3):
            out_full, full = model.step(seq[t], None, full, mode="seg")
            out_lean, lean = model.step(seq[t], None, lean, mode="seg", reconstruct_rgb=False)
            assert set(out_full.keys()) - set(out_lean.keys()) == {"rgb", "slot_rgb"}
            for key in out_lean.keys():
                torch.testing.assert_close(out_lean[key], out_full[key], msg=lambda m: f"frame {t}, {key}: {m}")
            for key in full.keys():
                torch.testing.assert_close(lean[key], full[key], msg=lambda m: f"frame {t}, state {key}: {m}")


def test_row_uniform_is_counter_based():
    seed = torch.tensor([1, 2, 3], dtype=torch.int64)
    frame = torch.tensor([0, 5, 7], dtype=torch.int64)
    u = row_uniform(seed, frame, 1, 4, 5)
    assert u.shape == (3, 4, 5) and (u > 0).all() and (u < 1).all()
    torch.testing.assert_close(row_uniform(seed[1:2], frame[1:2], 1, 4, 5), u[1:2], atol=0, rtol=0)
    assert not torch.equal(row_uniform(seed, frame, 2, 4, 5), u)  # another stream differs
    big = row_uniform(torch.arange(64), torch.zeros(64, dtype=torch.int64), 3, 1000)
    assert abs(big.mean().item() - 0.5) < 0.01


# ---- partial reset --------------------------------------------------------------------------------
def test_reset_state_isolation(tiny_model):
    model = tiny_model
    b, s = 3, model.config.image_size
    state = model.init_state(b, seed=7)
    with torch.no_grad():
        for t in range(2):
            _, state = model.step(frames(b, s, seed=t)[0], None, state, mode="rnd")
    mask = torch.tensor([True, False, True])
    reset = model.reset_state(state, mask, seed=99)
    fresh = model.init_state(b, seed=99)
    assert reset is not state
    for key in state.keys():
        assert torch.equal(reset[key][1], state[key][1]), f"untouched row changed: {key}"
        assert torch.equal(reset[key][mask], fresh[key][mask]), f"reset row differs from init: {key}"
    assert not reset["initialized"][mask].any() and reset["initialized"][1]
    # seed=None: new per-row seeds derived from the old ones, other rows still untouched
    reset2 = model.reset_state(state, mask)
    assert torch.equal(reset2["rng_seed"][1], state["rng_seed"][1])
    assert not torch.equal(reset2["rng_seed"][mask], state["rng_seed"][mask])


# ---- truncated BPTT -------------------------------------------------------------------------------
def test_detach_state_cuts_the_graph():
    torch.manual_seed(0)
    model = LociS(fast_config()).train()
    b, s = 1, model.config.image_size
    state = model.init_state(b, seed=0)
    seq = [frames(b, s, seed=t)[0] for t in range(5)]
    for window in range(2):
        total = torch.zeros(())
        for t in range(2 * window, 2 * window + 2):
            out, state = model.step(seq[t], None, state, mode="rnd")
            total = total + model.loss(out, seq[t], None, seq[t + 1])["total"]
        assert any(v.grad_fn is not None for v in state.values() if v.is_floating_point())
        total.backward()  # the second window must not reach the first window's (freed) graph
        state = model.detach_state(state)
        assert all(v.grad_fn is None for v in state.values()), "detach_state left a grad_fn"
        model.zero_grad()


# ---- checkpoints ----------------------------------------------------------------------------------
def test_save_load_round_trip(tiny_model, tmp_path):
    model = tiny_model
    path = model.save_pretrained(tmp_path / "ckpt" / "model.pt")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "locis-rl-checkpoint" and raw["format_version"] == FORMAT_VERSION
    assert raw["model"] == "LociS" and raw["config"] == model.config.to_dict() and "locis_rl_version" in raw
    loaded = LociS.from_pretrained(path).eval()
    s = model.config.image_size
    rgb = frames(2, s, seed=3)[0]
    with torch.no_grad():
        a, sa = model.step(rgb, None, model.init_state(2, seed=5), mode="rnd")
        c, sc = loaded.step(rgb, None, loaded.init_state(2, seed=5), mode="rnd")
    for key in a.keys():
        assert torch.equal(a[key], c[key]), key
    for key in sa.keys():
        assert torch.equal(sa[key], sc[key]), key


def test_checkpoint_errors(tiny_model, tmp_path):
    model = tiny_model
    with pytest.raises(FileNotFoundError, match="python -m locis_rl.pretrain"):
        LociS.from_pretrained(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*not a locis-rl checkpoint"):
        LociS.from_pretrained(foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        LociS.from_pretrained(text)
    path = model.save_pretrained(tmp_path / "good.pt")
    with pytest.raises(CheckpointError, match=r"config.image_size: checkpoint 64, expected 128"):
        LociS.from_pretrained(path, config=model.config.replace(image_size=128))
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format_version"):
        LociS.from_pretrained(tmp_path / "future.pt")
    raw = torch.load(path, weights_only=True)
    name = "percept_gate.output.weight"
    raw["state_dict"][name] = torch.zeros(3, 3)
    del raw["state_dict"]["transition.cells.0.output.bias"]
    torch.save(raw, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match=rf"{name}: checkpoint \(3, 3\).*") as info:
        LociS.from_pretrained(tmp_path / "shapes.pt")
    assert "transition.cells.0.output.bias" in str(info.value)
    raw = torch.load(path, weights_only=True)
    del raw["state_dict"]
    torch.save(raw, tmp_path / "nokeys.pt")
    with pytest.raises(CheckpointError, match="missing the keys.*state_dict"):
        LociS.from_pretrained(tmp_path / "nokeys.pt")


# ---- inference-time config overrides --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _changed_value(cfg: LociSConfig, key: str):
    """A valid value of ``key`` that differs from ``cfg``'s."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, str):
        return "rnd" if obj != "rnd" else "reg"
    if isinstance(obj, int):
        return obj + 3
    return obj * 0.5


def _assert_weights_equal(model: LociS, path) -> None:
    saved = torch.load(path, weights_only=True)["state_dict"]
    own = model.state_dict()
    assert own.keys() == saved.keys()
    for key, value in own.items():
        assert torch.equal(value, saved[key]), key


def test_num_slots_override_runs_k_slots_with_the_saved_weights(tiny_model, tiny_checkpoint):
    overrides = {"num_slots": 9, "assignment.mode": "rnd"}
    loaded = LociS.from_pretrained(tiny_checkpoint, overrides=overrides).eval()
    cfg = loaded.config
    assert cfg.num_slots == 9 and cfg.assignment.mode == "rnd"
    assert cfg.replace(num_slots=tiny_model.config.num_slots, assignment={"mode": "seg"}) == tiny_model.config
    _assert_weights_equal(loaded, tiny_checkpoint)
    rgb = frames(2, cfg.image_size, seed=4)[0]
    with torch.no_grad():
        out, state = loaded.step(rgb, state=loaded.init_state(2, seed=0))
        out, state = loaded.step(rgb, state=state)
    for key, shape in expected_shapes(cfg, 2).items():
        assert tuple(out[key].shape) == shape, key
    for key, shape in state_shapes(loaded, 2).items():
        assert tuple(state[key].shape) == shape, key
    # nested keys, and the expected config is the one after the overrides
    nested = LociS.from_pretrained(tiny_checkpoint, config=cfg,
                                   overrides={"num_slots": 9, "assignment": {"mode": "rnd"}})
    assert nested.config == cfg


@pytest.mark.parametrize("key", INFERENCE_OVERRIDE_KEYS)
def test_every_inference_override_key_loads_the_weights_strictly(tiny_model, tiny_checkpoint, key):
    value = _changed_value(tiny_model.config, key)
    loaded = LociS.from_pretrained(tiny_checkpoint, overrides={key: value})  # strict load_state_dict
    obj = loaded.config
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == value
    _assert_weights_equal(loaded, tiny_checkpoint)
    # the same by hand: a model built with the override takes the saved state_dict strictly
    head, _, rest = key.partition(".")
    strict = LociS(tiny_model.config.replace(**{head: {rest: value} if rest else value}))
    strict.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["state_dict"], strict=True)


def test_max_instances_changes_parameter_shapes_so_it_is_not_an_override():
    cfg = LociSConfig.preset("tiny")
    with torch.device("meta"):
        a = LociS(cfg).state_dict()
        b = LociS(cfg.replace(proposals={"max_instances": cfg.proposals.max_instances + 4})).state_dict()
    assert a["proposals.hyper.4.weight"].shape != b["proposals.hyper.4.weight"].shape
    assert "proposals.max_instances" not in INFERENCE_OVERRIDE_KEYS


@pytest.mark.parametrize("overrides, match", [
    ({"gestalt_size": 64}, r"'gestalt_size' cannot be overridden .*parameter shapes.*allowed .*'num_slots'"),
    ({"image_size": 128}, r"'image_size' cannot be overridden .*'assignment.mode'"),
    ({"proposals": {"max_instances": 12}}, r"'proposals.max_instances' cannot be overridden"),
    ({"num_slot": 8}, r"unknown config key 'num_slot'.*allowed .*'num_slots'"),
    ({"num_slots": 0}, r"num_slots must be >= 1"),
    ({"assignment.mode": "grid"}, r"assignment.mode: expected 'rnd', 'reg' or 'seg'"),
])
def test_disallowed_overrides_are_clear_errors(tiny_checkpoint, overrides, match):
    with pytest.raises(ConfigError, match=match):
        LociS.from_pretrained(tiny_checkpoint, overrides=overrides)


def test_override_keys_are_checked_before_the_file_is_read(tmp_path):
    with pytest.raises(ConfigError, match="gestalt_size"):
        LociS.from_pretrained(tmp_path / "missing.pt", overrides={"gestalt_size": 64})


# ---- paper sizes ----------------------------------------------------------------------------------
def test_paper_preset_has_appendix_sizes():
    with torch.device("meta"):
        model = LociS("paper")
    cfg = model.config
    assert (cfg.image_size, cfg.num_slots, cfg.gestalt_dim, cfg.transition.hidden) == (256, 16, 768, 1024)
    assert model.transition.cells[0].hidden_size == 1024
    # Table 5 reads 774 / 1550: the reference code carries two extra scalars per slot (a depth scale
    # and a separate z); our code is gestalt 768 + position 4 = 772 (gate: 2 x 772 + last position 4).
    assert model.transition.input_embedding[0].in_features == 768 + 4
    assert model.transition.output_embedding[-1].out_features == 768 + 4
    gate_in = model.percept_gate.body[0].in_features
    assert gate_in == 2 * (768 + 4) + 4
    assert model.percept_gate.body[0].out_features == 256
    assert model.encoder.embeddings[0].conv.out_channels == 32
    assert model.encoder.gestalt_heads[0].to_code.out_features == 256


# ---- warm-up counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("training,expected", [(True, 3), (False, 10)])
def test_warmup_iterations(training, expected):
    torch.manual_seed(0)
    model = LociS("tiny").train(training)
    assert (model.config.assignment.warmup_train, model.config.assignment.warmup_inference) == (3, 10)
    calls = []
    handle = model.encoder.register_forward_hook(lambda *_: calls.append(1))
    rgb = frames(1, model.config.image_size)[0]
    with torch.no_grad():
        _, state = model.step(rgb, None, model.init_state(1, seed=0), mode="rnd")
        assert len(calls) == expected + 1  # warm-up passes + the main pass
        calls.clear()
        model.step(rgb, None, state, mode="rnd")
        assert len(calls) == 1  # initialised rows skip the warm-up
    handle.remove()


# ---- input validation -----------------------------------------------------------------------------
def test_input_validation(tiny_model):
    model = tiny_model
    s = model.config.image_size
    rgb = torch.rand(1, 3, s, s)
    with pytest.raises(TypeError, match=r"rgb.float\(\) / 255"):
        model.step((rgb * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="64x64"):
        model.step(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model.step(torch.rand(1, 64, 64, 3))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        model.step(rgb * 2)
    bad = rgb.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.step(bad)
    with pytest.raises(ValueError, match="batch size"):
        model.step(rgb, state=model.init_state(2))
    with pytest.raises(ValueError, match="mode"):
        model.step(rgb, mode="random")
    with torch.device("cpu"):
        depth_model = LociS(fast_config(use_depth=True))
    with pytest.raises(ValueError, match="use_depth=True"):
        depth_model.step(rgb)
    with pytest.raises(ValueError, match="depth: expected shape"):
        depth_model.step(rgb, torch.rand(1, 3, s, s))
    with pytest.raises(ValueError, match="mask"):
        model.reset_state(model.init_state(2), torch.tensor([1, 0]))


# ---- bench CLI ------------------------------------------------------------------------------------
def test_bench_parser():
    from locis_rl.bench import build_parser

    args = build_parser().parse_args(["model", "--presets", "tiny", "paper", "--batch-sizes", "1", "16",
                                      "--device", "cpu", "--steps", "2", "--json", "out.json"])
    assert args.presets == ["tiny", "paper"] and args.batch_sizes == [1, 16] and args.mode == "seg"
    assert args.steps == 2 and args.json == "out.json" and callable(args.func)
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
    assert build_parser().parse_args(["model", "--no-rgb"]).no_rgb


def test_bench_model_times_the_lean_step():
    from locis_rl.bench import bench_model

    row = bench_model("tiny", "cpu", 2, steps=1, warmup_steps=0, reconstruct_rgb=False)
    assert row["rgb"] is False and row["latency_ms"] > 0 and row["batch"] == 2


def test_seg_mode_falls_back_to_sampling_when_the_proposal_network_finds_nothing():
    # An untrained (or out-of-distribution) proposal network returns no instance: the rows must
    # still get slots, sampled in the uncertainty map, instead of running with every slot absent.
    torch.manual_seed(0)
    model = LociS(fast_config(proposals={"score_threshold": 1.1})).eval()
    rgb, _ = frames(2, model.config.image_size)
    state = model.init_state(2, seed=3)
    with torch.no_grad():
        assert not model.proposals.predict_instances(rgb)["valid"].any()
        out, state = model.step(rgb, state=state, mode="seg")
    assert (out["presence"] > 0).any(dim=1).all(), out["presence"]
