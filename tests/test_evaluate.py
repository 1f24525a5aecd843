"""python -m locis_rl.evaluate: metric keys and ranges, visualisations, and an oracle check."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locis_rl.evaluate import METRIC_KEYS, evaluate_model, labels_from_masks, main

RANGES = {
    "FG-ARI": (-1.0, 1.0), "ARI-A": (-1.0, 1.0), "AMI-A": (-1.0, 1.0), "AMI-O": (-1.0, 1.0),
    "mIoU": (0.0, 1.0), "mIoU-seq": (0.0, 1.0), "F1": (0.0, 1.0), "OCA": (0.0, 1.0),
    "RGB-SSIM": (-1.0, 1.0), "Depth-SSIM": (-1.0, 1.0), "RGB-MSE": (0.0, 1.0), "Depth-MSE": (0.0, 1.0),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny.h5"
    from locis_rl.data.generate import main as generate_cli

    assert generate_cli(["--env", "locis/MultiObject-v0",
           "--episodes", "2", "--frames", "4", "--out", str(out), "--seed", "1", "--no-progress"]) == 0
    return out


def test_random_model_cli_reports_every_metric_and_writes_png_gif(dataset, tmp_path, capsys):
    from locis_rl.model import LociS, LociSConfig

    cfg = LociSConfig.preset("tiny").replace(assignment={"warmup_inference": 2})
    ckpt = LociS(cfg).save_pretrained(tmp_path / "model.pt")
    out_json, vis = tmp_path / "m.json", tmp_path / "vis"
    rc = main(["--checkpoint", str(ckpt), "--data", str(dataset), "--mode", "rnd", "--mode", "seg",
               "--json", str(out_json), "--out", str(vis), "--max-sequences", "1", "--visualize", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FG-ARI" in printed and "rnd" in printed
    res = json.loads(out_json.read_text())
    assert set(res["modes"]) == {"rnd", "seg"}
    for mode, metrics in res["modes"].items():
        assert metrics["sequences"] == 1
        for key in METRIC_KEYS:
            value = metrics[key]
            assert value is not None and math.isfinite(value), (mode, key, value)
            lo, hi = RANGES[key]
            assert lo - 1e-6 <= value <= hi + 1e-6, (mode, key, value)
        assert list(vis.glob(f"{mode}_seq000.png")) and list(vis.glob(f"{mode}_seq000.gif"))


def test_missing_checkpoint_and_data_are_clear_errors(dataset, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(dataset)]) == 2
    assert "no Loci-s checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", "default", "--data", str(tmp_path / "x.h5")]) in (2,)
    assert "x.h5" in capsys.readouterr().err


def test_cli_num_slots_and_overrides_reach_the_model(dataset, tmp_path, capsys, monkeypatch):
    import locis_rl.evaluate as evaluate
    from locis_rl.model import LociS, LociSConfig

    cfg = LociSConfig.preset("tiny").replace(assignment={"warmup_inference": 1})
    ckpt = LociS(cfg).save_pretrained(tmp_path / "model.pt")
    seen = {}

    def spy(model, *args, **kwargs):
        seen["num_slots"], seen["warmup"] = model.config.num_slots, model.config.assignment.warmup_inference
        return evaluate_model(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    out_json = tmp_path / "m.json"
    rc = main(["--checkpoint", str(ckpt), "--data", str(dataset), "--mode", "rnd", "--max-sequences", "1",
               "--num-slots", "9", "--override", "assignment.warmup_inference=2", "--json", str(out_json)])
    assert rc == 0
    assert seen == {"num_slots": 9, "warmup": 2}
    res = json.loads(out_json.read_text())
    assert res["overrides"] == {"num_slots": 9, "assignment.warmup_inference": 2}
    assert math.isfinite(res["modes"]["rnd"]["FG-ARI"])
    capsys.readouterr()
    assert main(["--checkpoint", str(ckpt), "--data", str(dataset), "--override", "gestalt_size=64"]) == 2
    err = capsys.readouterr().err
    assert "'gestalt_size' cannot be overridden" in err and "num_slots" in err
    assert main(["--checkpoint", str(ckpt), "--data", str(dataset), "--override", "num_slots"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_load_model_overrides_for_training_checkpoints_and_not_for_savi(tmp_path):
    from locis_rl.evaluate import load_model
    from locis_rl.model import LociS, LociSConfig
    from locis_rl.pretrain.checkpointing import save_train_checkpoint
    from locis_rl.savi import SAVi, SAViConfig

    model = LociS(LociSConfig.preset("tiny"))
    train_ckpt = save_train_checkpoint(tmp_path / "run" / "checkpoint.pt", {
        "config": {"model_family": "locis", "model": model.config.to_dict()}, "phases": [], "phase_index": 0,
        "step": 0, "model": model.state_dict()})
    loaded = load_model(tmp_path / "run", overrides={"num_slots": 8})
    assert loaded.config.num_slots == 8
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    with pytest.raises(ValueError, match="image_size"):
        load_model(train_ckpt, overrides={"image_size": 128})
    savi = SAVi(SAViConfig.preset("tiny")).save_pretrained(tmp_path / "savi.pt")
    with pytest.raises(ValueError, match="SAVi.*Loci-s checkpoints only"):
        load_model(savi, overrides={"num_slots": 8})
    assert isinstance(load_model(savi), SAVi)


def test_labels_from_masks_background_is_zero():
    masks = torch.zeros(1, 3, 2, 2)  # K = 2 slots + background (last)
    masks[0, 2] = 1.0
    masks[0, 0, 0, 0] = 2.0
    masks[0, 1, 1, 1] = 2.0
    assert labels_from_masks(masks).tolist() == [[[1, 0], [0, 2]]]


class _Oracle(nn.Module):
    """Returns the ground-truth masks, decoded from the segmentation hidden in the red channel."""

    def __init__(self, image_size: int, num_slots: int):
        super().__init__()
        from locis_rl.model import LociSConfig

        self.config = LociSConfig.preset("tiny").replace(image_size=image_size, num_slots=num_slots)
        self.dummy = nn.Parameter(torch.zeros(1))

    def init_state(self, batch_size, device=None, seed=None):
        return {}

    def step(self, rgb, depth=None, state=None, mode=None):
        ids = (rgb[:, 0] * 255).round().long()  # [B,H,W], 0 = background
        k = self.config.num_slots
        channel = torch.where(ids == 0, torch.full_like(ids, k), ids - 1)
        masks = F.one_hot(channel, k + 1).permute(0, 3, 1, 2).float()
        b, _, h, w = rgb.shape
        return {"masks": masks, "rgb": rgb, "depth": torch.zeros(b, 1, h, w)}, state


def test_oracle_masks_give_perfect_scores(dataset):
    from locis_rl.data import VideoDataset

    ds = VideoDataset(dataset, seq_len=4)
    items = []
    for i in range(len(ds)):
        item = ds[i]
        seg = item["segmentation"]
        assert seg.max() > 0
        rgb = item["rgb"].clone()
        rgb[:, 0] = seg.float() / 255.0
        items.append({"rgb": rgb, "segmentation": seg})
    k = int(max(int(it["segmentation"].max()) for it in items))
    res = evaluate_model(_Oracle(64, k), items, ["rnd"], batch_size=2)
    m = res["modes"]["rnd"]
    assert m["sequences"] == len(items)
    assert m["FG-ARI"] == pytest.approx(1.0)
    assert m["mIoU"] == pytest.approx(1.0) and m["mIoU-seq"] == pytest.approx(1.0)
    assert m["ARI-A"] == pytest.approx(1.0) and m["F1"] == pytest.approx(1.0) and m["OCA"] == pytest.approx(1.0)
    assert math.isnan(m["Depth-MSE"])  # the items carry no depth


def test_per_frame_scores_show_which_frames_fail(dataset):
    """``per_frame``: the oracle is perfect on frames 0-1 and blind (all background) on 2-3."""
    from locis_rl.data import VideoDataset

    ds = VideoDataset(dataset, seq_len=4)
    items = []
    for i in range(len(ds)):
        seg = ds[i]["segmentation"]
        rgb = torch.zeros(seg.shape[0], 3, *seg.shape[1:])
        rgb[:2, 0] = seg[:2].float() / 255.0  # frames 2-3: no object reaches the oracle
        items.append({"rgb": rgb, "segmentation": seg})
    k = int(max(int(it["segmentation"].max()) for it in items))
    res = evaluate_model(_Oracle(64, k), items, ["rnd"], batch_size=2, per_frame=True)
    per_frame = res["modes"]["rnd"]["per_frame"]
    assert set(per_frame) == {"FG-ARI", "mIoU"} and all(len(v) == 4 for v in per_frame.values())
    assert per_frame["FG-ARI"][:2] == pytest.approx([1.0, 1.0])
    assert per_frame["mIoU"][:2] == pytest.approx([1.0, 1.0])
    assert max(per_frame["mIoU"][2:]) < 0.5
    assert "per_frame" not in evaluate_model(_Oracle(64, k), items, ["rnd"], batch_size=2)["modes"]["rnd"]
