"""SAVi through ``python -m locis_rl.pretrain`` (model_family=savi): outputs, resume, conditional
training, and ``python -m locis_rl.evaluate`` on SAVi checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from locis_rl.model.config import ConfigError
from locis_rl.pretrain.config import load_train_config
from locis_rl.pretrain.run import train

# 2 sequences of 2 rows x 4 frames (2 BPTT windows each), cheap evaluation
TINY = {
    "stages.savi.steps": 2,
    "stages.savi.batch_size": 2,
    "stages.savi.seq_len": 4,
    "stages.savi.bptt": 2,
    "eval.max_sequences": 1,
    "image_every": 0,
    "log_every": 1,
    "progress": False,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 episodes x 6 frames of locis/MultiObject-v0 written by the data CLI (as test_pretrain)."""
    out = tmp_path_factory.mktemp("data") / "tiny.h5"
    from locis_rl.data.generate import main as generate_cli

    assert generate_cli(["--env", "locis/MultiObject-v0",
           "--episodes", "2", "--frames", "6", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    return out


def _cfg(dataset: Path, **extra):
    return load_train_config("savi-quickstart", {**TINY, "data.paths": [str(dataset)], **extra})


@pytest.fixture(scope="module")
def boxes_run(dataset, tmp_path_factory) -> Path:
    """A conditional (boxes) SAVi trained 2 steps: GT first-frame boxes in training."""
    run = tmp_path_factory.mktemp("runs") / "boxes"
    result = train(_cfg(dataset, **{"model.conditioning": "boxes"}), run_dir=run, log=lambda m: None)
    assert result.completed and len(result.losses) == 2  # one (window-averaged) loss per sequence
    return run


def test_cli_trains_savi_and_writes_every_output(dataset, tmp_path, capsys):
    from locis_rl.pretrain.__main__ import main
    from locis_rl.savi import SAVi

    run = tmp_path / "run"
    args = [f"{k}={v}" for k, v in TINY.items()]
    assert main(["--preset", "savi-quickstart", "--data", str(dataset), "--run-dir", str(run), *args]) == 0
    assert "finished" in capsys.readouterr().out
    for name in ("checkpoint.pt", "model.pt", "metrics.json", "config.json"):
        assert (run / name).exists(), name
    assert list((run / "images").glob("*.png")), "no slot-decomposition PNG"
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    model = SAVi.from_pretrained(run / "model.pt")
    assert model.config.conditioning == "unconditional-learned" and model.config.num_slots == 6
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["phases"] == ["savi"] and ckpt["phase_index"] == 1
    assert ckpt["global_step"] == 2  # training sequences (each 2 BPTT windows = 2 optimiser updates)
    assert ckpt["config"]["model_family"] == "savi"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"savi"}
    for key in ("FG-ARI", "mIoU", "RGB-MSE"):
        assert metrics["modes"]["savi"][key] is not None, key


def test_model_flag_and_stage_checks(dataset):
    from locis_rl.pretrain.__main__ import main

    cfg = load_train_config("quickstart", {"model_family": "savi"})  # == --model savi
    assert type(cfg.model).__name__ == "SAViConfig" and cfg.model.num_slots == 6  # tiny -> savi-tiny
    with pytest.raises(ConfigError, match="model_family"):
        load_train_config("quickstart", {"model_family": "slot-attention"})
    with pytest.raises(ConfigError, match="savi"):
        train(_cfg(dataset), stage="objects", log=lambda m: None)
    assert main(["--preset", "savi-quickstart", "--stage", "full", "--data", str(dataset)]) == 2


def test_resume_matches_uninterrupted_run(dataset, tmp_path):
    """Stop after 3 sequences (checkpoint at 2), resume to 4: weights equal an uninterrupted run."""
    extra = {"eval.enabled": False, "stages.savi.steps": 4, "stages.savi.seq_len": 2,
             "checkpoint_every": 2, "optim.lookahead_k": 2}
    full = train(_cfg(dataset, **extra), run_dir=tmp_path / "a", log=lambda m: None)
    stopped = train(_cfg(dataset, **extra, stop_after_steps=3), run_dir=tmp_path / "b", log=lambda m: None)
    assert not stopped.completed and not (tmp_path / "b" / "model.pt").exists()
    assert stopped.losses == pytest.approx(full.losses[:3], rel=1e-6, abs=1e-7)
    resumed = train(None, resume=tmp_path / "b", log=lambda m: None)
    assert resumed.completed and resumed.global_step == 4
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match="model"):
        train(None, resume=tmp_path / "b", overrides={"model_family": "locis"}, log=lambda m: None)


def test_evaluate_savi_unconditional_and_boxes(dataset, boxes_run, tmp_path, capsys):
    from locis_rl.evaluate import load_model, main
    from locis_rl.savi import SAVi, SAViConfig

    plain = SAVi(SAViConfig.preset("tiny")).save_pretrained(tmp_path / "plain.pt")
    out_json = tmp_path / "plain.json"
    assert main(["--checkpoint", str(plain), "--data", str(dataset), "--json", str(out_json),
                 "--max-sequences", "1", "--out", str(tmp_path / "vis"), "--visualize", "1"]) == 0
    res = json.loads(out_json.read_text())
    assert set(res["modes"]) == {"savi"}
    assert 0.0 <= res["modes"]["savi"]["mIoU"] <= 1.0 and res["modes"]["savi"]["Depth-MSE"] is None
    assert (tmp_path / "vis" / "savi_seq000.png").exists()

    # the trained conditional model: model.pt, the run directory and checkpoint.pt all load
    for ckpt in (boxes_run / "model.pt", boxes_run, boxes_run / "checkpoint.pt"):
        model = load_model(ckpt)
        assert isinstance(model, SAVi) and model.config.conditioning == "boxes"
    out_json = tmp_path / "boxes.json"
    assert main(["--checkpoint", str(boxes_run), "--data", str(dataset), "--conditioning", "boxes",
                 "--json", str(out_json), "--max-sequences", "2"]) == 0
    assert "savi-boxes" in capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert set(res["modes"]) == {"savi-boxes"} and res["modes"]["savi-boxes"]["sequences"] == 2
    assert -1.0 <= res["modes"]["savi-boxes"]["FG-ARI"] <= 1.0
    # the model's conditioning is fixed; SAVi has no rnd/reg/seg modes
    assert main(["--checkpoint", str(boxes_run), "--data", str(dataset), "--conditioning", "centers"]) == 2
    assert "conditioning" in capsys.readouterr().err
    assert main(["--checkpoint", str(boxes_run), "--data", str(dataset), "--mode", "seg"]) == 2
    assert "SAVi has no slot-assignment modes" in capsys.readouterr().err
    metrics = json.loads((boxes_run / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"savi-boxes"}
