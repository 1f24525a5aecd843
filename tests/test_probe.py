"""Slot probes (`locis_rl.probe`): matching, probe fitting, end-to-end and CLI smoke runs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from locis_rl.probe import (
    collect_slot_features,
    fit_probes,
    format_table,
    load_probe_model,
    match_slots,
    run_probe,
    split_episodes,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ matching
def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    """[K+1,H,W] masks from a label map whose value ``k`` means background."""
    return (labels[None] == np.arange(k + 1)[:, None, None]).astype(np.float32)


def test_match_slots_synthetic_case():
    k, bg = 4, 4
    seg = np.zeros((8, 8), np.int32)
    seg[0:2, 0:4] = 5      # 8 px
    seg[4:8, 0:2] = 2      # 8 px
    seg[6:8, 6:8] = 7      # 4 px, no slot on it
    seg[0:1, 7:8] = 9      # 1 px, only weakly covered by slot 3
    labels = np.full((8, 8), bg)
    labels[0:2, 0:4] = 1   # slot 1 == object 5 (IoU 1)
    labels[4:6, 0:2] = 0   # slot 0 = half of object 2 (IoU 4 / 8)
    labels[0:4, 5:8] = 3   # slot 3: 12 px, contains the 1-px object 9 (IoU 1 / 12 < 0.2)
    slots, ids, ious, visible = match_slots(_one_hot(labels, k), seg, min_iou=0.2)
    assert visible == 4
    assert slots.tolist() == [0, 1]
    assert ids.tolist() == [2, 5]
    np.testing.assert_allclose(ious, [0.5, 1.0])
    # a lower threshold keeps the weak pair; soft masks give the same argmax; torch inputs work
    soft = _one_hot(labels, k) * 0.6 + 0.4 / (k + 1)
    slots, ids, ious, _ = match_slots(torch.from_numpy(soft), torch.from_numpy(seg), min_iou=0.05)
    assert list(zip(slots.tolist(), ids.tolist())) == [(0, 2), (1, 5), (3, 9)]
    np.testing.assert_allclose(ious, [0.5, 1.0, 1 / 12])


def test_match_slots_is_one_to_one_and_global():
    # slot 0's best object is 1 (IoU 5/14 vs 4/15), but slot 1 fits object 1 better (IoU 0.5);
    # maximising the total IoU gives slot 0 object 2 and slot 1 object 1.
    seg = np.zeros((4, 20), np.int32)
    seg[:, 0:10] = 1
    seg[:, 10:20] = 2
    labels = np.full((4, 20), 2)
    labels[:, 0:5] = 1
    labels[:, 5:14] = 0
    slots, ids, ious, visible = match_slots(_one_hot(labels, 2), seg, min_iou=0.0)
    assert visible == 2 and slots.tolist() == [0, 1] and ids.tolist() == [2, 1]
    np.testing.assert_allclose(ious, [4 / 15, 0.5])
    # no objects / zero-overlap pairs -> nothing matched
    empty = match_slots(_one_hot(labels, 2), np.zeros((4, 20), np.int32))
    assert empty[0].size == 0 and empty[3] == 0
    apart = np.full((4, 20), 2)
    apart[:, 0:10] = 0
    slots, *_ = match_slots(_one_hot(apart, 2), np.where(seg == 2, 2, 0), min_iou=0.0)
    assert slots.size == 0


# ------------------------------------------------------------------------------------- probes
def _synthetic(n_episodes=20, per_episode=20, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    n = n_episodes * per_episode
    x = rng.normal(size=(n, dim))
    groups = np.repeat(np.arange(n_episodes), per_episode)
    return rng, x, groups


def test_split_episodes_holds_out_whole_episodes():
    groups = np.repeat(np.arange(8), 3)
    train, test = split_episodes(groups, 0.25, seed=1)
    assert not set(groups[train]) & set(groups[test])
    assert len(set(groups[test])) == 2 and (train | test).all()
    train, test = split_episodes(np.zeros(5, int))
    assert train.all() and not test.any()


def test_fit_probes_linear_targets_noise_and_shape():
    rng, x, groups = _synthetic()
    targets = {
        "position": x @ rng.normal(size=(10, 3)) + 0.01 * rng.normal(size=(len(x), 3)),
        "color": rng.normal(size=(len(x), 3)),             # independent of the features
        "size": np.full((len(x), 3), 0.07),                 # constant: R^2 undefined
        "shape": np.argmax(x[:, :3], axis=1),               # linearly separable classes
    }
    res = fit_probes(x, targets, groups, probes=("linear", "mlp"), seed=0)
    lin, mlp = res["linear"], res["mlp"]
    assert lin["n_train"] + lin["n_test"] == len(x) and lin["n_test"] == 100
    assert lin["position_r2"] > 0.99 and mlp["position_r2"] > 0.9
    assert abs(lin["color_r2"]) < 0.1 and mlp["color_r2"] < 0.15
    assert math.isnan(lin["size_r2"]) and math.isnan(mlp["size_r2"])
    assert lin["shape_acc"] > 0.9 and mlp["shape_acc"] > 0.8
    assert 0.2 < lin["shape_chance"] < 0.55


def test_fit_probes_too_few_samples_gives_nan():
    x = np.random.default_rng(0).normal(size=(3, 4))
    res = fit_probes(x, {"position": x[:, :3], "shape": np.array([0, 1, 0])}, np.array([0, 1, 2]),
                     probes=("linear",))
    assert math.isnan(res["linear"]["position_r2"]) and math.isnan(res["linear"]["shape_acc"])
    with pytest.raises(ValueError, match="probes"):
        fit_probes(x, {}, np.array([0, 1, 2]), probes=("svm",))


# ------------------------------------------------------------------------------- end to end
class _StripeModel(torch.nn.Module):
    """A fake slot model: slot k owns the k-th vertical stripe; features are stripe colour stats."""

    def __init__(self, k: int = 4, size: int = 32):
        super().__init__()
        self.config = type("Cfg", (), {"image_size": size, "num_slots": k, "gestalt_dim": 6})()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def init_state(self, batch_size, device=None, seed=None):
        return {"t": 0}

    def step(self, rgb, depth=None, state=None, mode=None):
        b, _, h, w = rgb.shape
        k = self.config.num_slots
        stripe = torch.arange(w) * k // w
        masks = torch.zeros(b, k + 1, h, w)
        masks[:, :k] = (stripe == torch.arange(k)[:, None]).float()[None, :, None, :]
        area = masks[:, :k].sum((2, 3)).clamp_min(1)
        mean = torch.einsum("bkhw,bchw->bkc", masks[:, :k], rgb) / area[..., None]
        gestalt = torch.cat([mean, mean ** 2], dim=-1)
        position = torch.zeros(b, k, 4)
        position[..., 0] = (torch.arange(k) + 0.5) / k * 2 - 1
        slot_depth = torch.einsum("bkhw,bchw->bkc", masks[:, :k], depth) / area[..., None]
        return {"masks": masks, "gestalt": gestalt, "position": position, "slot_depth": slot_depth}, state


def test_collect_slot_features_with_fake_model():
    torch.set_num_threads(1)
    model = _StripeModel()
    data = collect_slot_features(model, "locis/MultiObject-v0", {"level": "a"}, episodes=3, frames=2,
                                 seed=0, min_iou=0.01, batch_size=2)
    n = int(data["num_matched"])
    assert int(data["num_frames"]) == 6 and 0 < n <= int(data["num_visible"])
    assert data["features"].shape == (n, 6 + 4 + 1)
    for key, width in (("target_position", 3), ("target_color", 3), ("target_size", 3)):
        assert data[key].shape == (n, width)
    assert data["target_shape"].dtype == np.int64 and data["target_shape"].max() < 5
    assert set(np.unique(data["episode"])) <= {0, 1, 2} and (data["iou"] >= 0.01).all()
    assert ((data["target_color"] >= 0) & (data["target_color"] <= 1)).all()
    visible_ids, visible_counts = np.unique(data["visible_object_id"], return_counts=True)
    assert data["visible_object_id"].size == int(data["num_visible"])
    for object_id, count in zip(visible_ids, visible_counts):  # an object is matched at most once a frame
        assert (data["object_id"] == object_id).sum() <= count
    assert set(data["object_id"]) <= set(visible_ids)


def test_run_probe_tiny_locis_end_to_end():
    torch.set_num_threads(1)
    report = run_probe("tiny", "locis/MultiObject-v0", {"level": "a"}, episodes=2, frames=4, seed=0,
                       batch_size=2)
    assert report["settings"]["trained"] is False and report["settings"]["model_class"] == "LociS"
    assert [r["model"] for r in report["results"]] == ["tiny (random)", "control (random init)"]
    for res in report["results"]:
        assert res["num_frames"] == 8 and res["num_visible"] > 0
        assert 0.0 <= res["match_rate"] <= 1.0
        by_object = res["match_rate_by_object"]
        assert by_object and all(0.0 <= r <= 1.0 for r in by_object.values())
        assert set(res["probes"]["all"]) == {"linear", "mlp"}
        assert {"position_r2", "position_xy_r2", "color_r2", "size_r2", "shape_acc", "shape_chance"} <= set(
            res["probes"]["all"]["linear"])
    table = format_table(report)
    assert table.count("\n") == 5 and "position R²" in table and "control (random init)" in table


def test_num_slots_changes_a_locis_model_and_is_refused_for_savi():
    torch.set_num_threads(1)
    report = run_probe("tiny", "locis/MultiObject-v0", {"level": "a"}, episodes=1, frames=2, seed=0,
                       control=False, probes=("linear",), num_slots=3)
    assert report["settings"]["num_slots"] == 3
    with pytest.raises(ValueError, match="SAVi"):
        load_probe_model("savi-tiny", num_slots=3)


def test_default_checkpoint_missing_message(monkeypatch, tmp_path):
    import locis_rl.model.locis as locis

    monkeypatch.setattr(locis, "DEFAULT_CHECKPOINT", tmp_path / "missing.pt")  # as if none shipped
    with pytest.raises(FileNotFoundError, match="--checkpoint tiny"):
        load_probe_model("default")


def test_cli_smoke(tmp_path):
    out = tmp_path / "probe.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "locis_rl.probe", "--checkpoint", "tiny", "--env-kwargs", "level=a",
         "--episodes", "2", "--frames", "2", "--no-control", "--threads", "1", "--num-slots", "5",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert "| tiny (random) | linear |" in proc.stdout and "match rate by object id" in proc.stdout
    report = json.loads(out.read_text())
    assert len(report["results"]) == 1 and report["settings"]["env_kwargs"]["level"] == "a"
    assert report["settings"]["num_slots"] == 5
