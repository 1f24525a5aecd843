"""python -m locis_rl.pretrain: stages, outputs, resume, errors, no-mask data, torchrun/gloo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locis_rl.model.config import ConfigError
from locis_rl.pretrain.config import load_train_config
from locis_rl.pretrain.run import train

ROOT = Path(__file__).resolve().parent.parent

# every stage 2 steps, batches of 2, 4-frame sequences, cheap evaluation
TINY = {
    "stages.background.uncertainty_steps": 2,
    "stages.background.extractor_steps": 2,
    "stages.background.batch_size": 2,
    "stages.objects.steps": 2,
    "stages.objects.batch_size": 2,
    "stages.proposal.steps": 2,
    "stages.proposal.batch_size": 2,
    "stages.full.steps": 2,
    "stages.full.batch_size": 2,
    "stages.full.seq_len": 4,
    "model.num_slots": 3,
    "model.assignment.warmup_inference": 2,
    "eval.max_sequences": 1,
    "eval.modes": ["rnd", "seg"],
    "image_every": 0,
    "log_every": 1,
    "progress": False,
    "num_threads": 1,
}


def _cli_args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        if isinstance(v, (list, tuple)):
            v = "[" + ",".join(str(x) for x in v) + "]"
        out.append(f"{k}={v}")
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 episodes x 6 frames of locis/MultiObject-v0 written by the data CLI."""
    out = tmp_path_factory.mktemp("data") / "tiny.h5"
    from locis_rl.data.generate import main as generate_cli

    assert generate_cli(["--env", "locis/MultiObject-v0",
           "--episodes", "2", "--frames", "6", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def dataset_without_masks(dataset, tmp_path_factory) -> Path:
    """The same videos with the segmentation removed (as recorded from an env without labels)."""
    import h5py

    out = tmp_path_factory.mktemp("data") / "nomask.h5"
    shutil.copy(dataset, out)
    with h5py.File(out, "r+") as f:
        del f["segmentation"]
        f.attrs["has_segmentation"] = False
        f.attrs["segmentation_source"] = "none"
    return out


def _cfg(dataset: Path, **extra):
    overrides = {**TINY, "data.paths": [str(dataset)], **extra}
    return load_train_config("quickstart", overrides)


@pytest.mark.parametrize("stage", ["background", "objects", "proposal", "full"])
def test_each_stage_runs(stage, dataset, tmp_path):
    one_step = {"stages.background.uncertainty_steps": 1, "stages.background.extractor_steps": 1,
                "stages.objects.steps": 1, "stages.proposal.steps": 1, "stages.full.steps": 1}
    cfg = _cfg(dataset, **{"eval.enabled": False, **one_step})
    result = train(cfg, stage=stage, run_dir=tmp_path / "run", log=lambda m: None)
    assert result.completed
    expected = 2 if stage == "background" else 1
    assert len(result.losses) == expected
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "model.pt").exists()


def test_time_budget_ends_a_phase_early_and_completes(dataset, tmp_path):
    # A budget of ~0 minutes: the phase stops before its first step, is checkpointed as done, and
    # the run goes on to write its model.
    cfg = _cfg(dataset, **{"eval.enabled": False, "stages.objects.steps": 50,
                           "stages.objects.max_minutes": 1e-9})
    messages: list[str] = []
    result = train(cfg, stage="objects", run_dir=tmp_path / "run", log=messages.append)
    assert result.completed
    assert len(result.losses) == 0
    assert any("time budget" in m for m in messages), messages
    assert (tmp_path / "run" / "model.pt").exists()


def test_objects_stage_position_supervision(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(dataset, **{"eval.enabled": False, "stages.objects.steps": 2, "log_every": 1,
                           "stages.objects.position_weight": 1.0, "stages.objects.teacher_position": True})
    result = train(cfg, stage="objects", run_dir=tmp_path / "run", log=lambda m: None)
    assert result.completed and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    position_loss = [e.value for e in events.Scalars("loss/objects_position")]
    assert len(position_loss) == 2 and all(v > 0 for v in position_loss)


def test_objects_context_phase_trains(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(dataset, **{"eval.enabled": False, "stages.objects.steps": 1, "log_every": 1,
                           "stages.objects.context_steps": 2, "stages.objects.context_batch_size": 2,
                           "stages.objects.context_passes": 2})
    result = train(cfg, stage="objects", run_dir=tmp_path / "run", log=lambda m: None)
    assert result.completed and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert len(events.Scalars("charts/context_mask_iou_pass2")) == 2


def test_full_long_phase_has_its_own_schedule(dataset, tmp_path):
    """``full/long`` follows ``full`` with a fresh schedule over ``long_schedule_steps``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(dataset, **{"eval.enabled": False, "optim.warmup_steps": 0, "optim.schedule": "cosine",
                           "stages.full.steps": 2, "stages.full.long_steps": 3,
                           "stages.full.long_schedule_steps": 300})
    result = train(cfg, stage="full", run_dir=tmp_path / "run", log=lambda m: None)
    assert result.completed and len(result.losses) == 5
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["phases"] == ["full", "full/long"]
    from locis_rl.pretrain.stages import phases_for

    assert phases_for("all", cfg)[-2:] == ["full", "full/long"]
    assert "full/long" not in phases_for("all", _cfg(dataset))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert len(events.Scalars("loss/full/long")) == 3
    lr = [e.value for e in events.Scalars("charts/lr")]
    base = cfg.optim.lr * cfg.stages.full.lr_scale
    # ``full`` decays to 10 % over its 2 steps; ``full/long`` restarts at the top and is still
    # there after 3 of its 300 scheduled steps.
    assert lr[1] == pytest.approx(0.1 * base, rel=1e-3)
    assert all(v > 0.99 * base for v in lr[2:])


def test_time_based_checkpoints(dataset, tmp_path):
    # No step-count checkpoints, a checkpoint whenever ~0 minutes have passed: the run stopped
    # after 2 of 4 steps resumes from step 2.
    cfg = _cfg(dataset, **{"eval.enabled": False, "stages.objects.steps": 4, "checkpoint_every": 0,
                           "checkpoint_minutes": 1e-9, "stop_after_steps": 2})
    result = train(cfg, stage="objects", run_dir=tmp_path / "run", log=lambda m: None)
    assert not result.completed
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (ckpt["phase_index"], ckpt["step"]) == (0, 2)
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        _cfg(dataset, checkpoint_minutes=-1)
    with pytest.raises(ConfigError, match="long_schedule_steps"):
        _cfg(dataset, **{"stages.full.long_steps": 10, "stages.full.long_schedule_steps": 5})


def test_resume_spends_only_the_rest_of_a_time_budget(dataset, tmp_path):
    # A phase with `max_minutes` that is stopped and resumed trains for its budget in all, not for a
    # fresh budget per invocation. The checkpoint records the phase's training seconds; here they
    # are set to the whole budget, so the resumed phase must end at once.
    from locis_rl.benchmark import training_budget

    cfg = _cfg(dataset, **{"eval.enabled": False, "stages.objects.steps": 6, "stages.objects.max_minutes": 30,
                           "checkpoint_every": 1, "stop_after_steps": 2})
    run = tmp_path / "run"
    train(cfg, stage="objects", run_dir=run, log=lambda m: None)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and 0 < ckpt["phase_seconds"]["objects"] < 30 * 60
    ckpt["phase_seconds"]["objects"] = 30 * 60.0
    torch.save(ckpt, run / "checkpoint.pt")
    logs: list[str] = []
    resumed = train(None, resume=run, log=logs.append)
    assert resumed.completed and resumed.losses == []  # not one more step
    assert any("time budget of 30 min used up after 2 steps (0 in this invocation)" in m for m in logs), logs
    budget = training_budget(run / "model.pt")
    assert budget["global_step"] == 2 and budget["train_seconds"] >= 30 * 60
    assert budget["phase_seconds"]["objects"] >= 30 * 60
    assert json.loads((run / "config.json").read_text())["stages"]["objects"]["max_minutes"] == 30


def test_resume_records_a_missing_cached_dataset_again(tmp_path):
    # A run on the preset's cached recording resumed where that cache is gone (a fresh machine):
    # the seeded recording is made again, bit for bit, and the run goes on from its checkpoint.
    import h5py

    overrides = {**TINY, "data.paths": [], "data.cache_dir": str(tmp_path / "cache"), "data.levels": ["a"],
                 "data.episodes": 2, "data.frames": 6, "data.workers": 1, "eval.enabled": False,
                 "stages.objects.steps": 3, "checkpoint_every": 1, "stop_after_steps": 2}
    run = tmp_path / "run"
    train(load_train_config("quickstart", overrides), stage="objects", run_dir=run, log=lambda m: None)
    (cached,) = torch.load(run / "checkpoint.pt", weights_only=False)["data_paths"]
    with h5py.File(cached, "r") as f:
        first = f["rgb"][:]
    shutil.rmtree(tmp_path / "cache")
    logs: list[str] = []
    resumed = train(None, resume=run, log=logs.append)
    assert resumed.completed and len(resumed.losses) == 1
    assert any("is not here; recording it again" in m for m in logs), logs
    with h5py.File(cached, "r") as f:
        assert (f["rgb"][:] == first).all()


def test_all_stages_write_every_output(dataset, tmp_path):
    from locis_rl.model import LociS

    run = tmp_path / "run"
    cfg = _cfg(dataset)
    result = train(cfg, stage="all", run_dir=run, log=lambda m: None)
    assert result.completed and result.global_step == 10
    for name in ("checkpoint.pt", "model.pt", "metrics.json", "config.json"):
        assert (run / name).exists(), name
    assert list((run / "images").glob("*.png")), "no slot-decomposition PNG"
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"rnd", "seg"}
    for key in ("FG-ARI", "mIoU", "RGB-SSIM"):
        assert key in metrics["modes"]["rnd"]
    model = LociS.from_pretrained(run / "model.pt")
    assert model.config.num_slots == cfg.model.num_slots
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == "locis-rl-train-checkpoint" and ckpt["format_version"] == 1
    assert ckpt["phase_index"] == len(ckpt["phases"]) == 5
    # evaluate accepts the run directory and the training checkpoint as well as model.pt
    from locis_rl.evaluate import load_model

    from_ckpt = load_model(run / "checkpoint.pt").state_dict()
    for k, v in load_model(run).state_dict().items():
        assert torch.equal(v, from_ckpt[k]), k


def test_resume_matches_uninterrupted_run(dataset, tmp_path):
    """Stop after 3 steps (checkpoint at 2), resume to 4: weights equal an uninterrupted 4-step run."""
    extra = {"eval.enabled": False, "stages.objects.steps": 4, "checkpoint_every": 2,
             "optim.lookahead_k": 2}
    full = train(_cfg(dataset, **extra), stage="objects", run_dir=tmp_path / "a", log=lambda m: None)
    stopped = train(_cfg(dataset, **extra, stop_after_steps=3), stage="objects", run_dir=tmp_path / "b",
                    log=lambda m: None)
    assert not stopped.completed and not (tmp_path / "b" / "model.pt").exists()
    # --export writes the stopped run's weights (checkpoint at step 2) as a loadable model file
    from locis_rl.model import LociS
    from locis_rl.pretrain.__main__ import main

    assert main(["--export", str(tmp_path / "b"), str(tmp_path / "export.pt")]) == 0
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["--export", str(tmp_path / "junk.pt"), str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
    exported = LociS.from_pretrained(tmp_path / "export.pt").state_dict()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    # same seed -> same losses
    assert stopped.losses == pytest.approx(full.losses[:3], rel=1e-6, abs=1e-7)
    resumed = train(None, resume=tmp_path / "b", log=lambda m: None)
    assert resumed.completed
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-6)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "configs" / "train").glob("*.yaml")))
def test_every_training_preset_loads(preset):
    from locis_rl.pretrain.stages import phases_for

    cfg = load_train_config(preset)
    assert cfg.preset == preset
    if cfg.model_family == "locis":
        phases = phases_for("all", cfg)
        assert phases[0] == "background/uncertainty" and "full" in phases
        if preset == "shipped":  # the shipped recipe is one command: its long phase is in the preset
            assert phases[-1] == "full/long" and cfg.stages.full.long_steps == 800


def test_unknown_config_key_is_a_clear_error(dataset, capsys):
    with pytest.raises(ConfigError, match="stepz"):
        load_train_config("quickstart", ["stages.full.stepz=3"])
    with pytest.raises(ConfigError, match="unknown training preset"):
        load_train_config("no-such-preset")
    from locis_rl.pretrain.__main__ import main

    assert main(["--data", str(dataset), "--run-dir", "unused-run-dir", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key" in err and "lrr" in err


def test_missing_data_and_bad_resume_are_clear_errors(tmp_path, capsys):
    from locis_rl.pretrain.__main__ import main

    assert main(["--data", str(tmp_path / "missing.h5"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing.h5" in err and "does not exist" in err
    assert not (tmp_path / "r").exists()  # a failed start leaves no run directory behind
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--resume", str(tmp_path / "empty")]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err


def test_videos_without_masks_train_and_skip_the_proposal_stage(dataset_without_masks, tmp_path):
    messages: list[str] = []
    run = tmp_path / "run"
    result = train(_cfg(dataset_without_masks), stage="all", run_dir=run, log=messages.append)
    assert result.completed
    assert any("skipping the proposal stage" in m for m in messages)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert "proposal" not in ckpt["phases"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"rnd"}  # seg needs a trained proposal network
    assert metrics["modes"]["rnd"]["FG-ARI"] is None  # no masks: no segmentation metrics
    assert metrics["modes"]["rnd"]["RGB-MSE"] >= 0


def test_connected_components_match_scipy():
    from scipy import ndimage

    from locis_rl.pretrain.data import connected_components

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 20, 24, generator=g) > 0.55
    labels = connected_components(masks)
    for m, lab in zip(masks, labels):
        ref, n = ndimage.label(m.numpy())
        assert int(lab.max()) == n
        # same partition: a bijection between the label sets
        pairs = {(int(a), int(b)) for a, b in zip(lab.flatten(), torch.from_numpy(ref).flatten())}
        assert len(pairs) == n + 1


def test_lookahead_state_dict_round_trip():
    from locis_rl.pretrain.config import OptimConfig
    from locis_rl.pretrain.optim import build_optimizer

    def run(steps, resume_at=None):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        opt = build_optimizer(net.parameters(), OptimConfig(lookahead_k=3))
        for i in range(steps):
            if i == resume_at:
                sd = {k: v.clone() for k, v in net.state_dict().items()}
                osd = opt.state_dict()
                net = torch.nn.Linear(4, 3)
                net.load_state_dict(sd)
                opt = build_optimizer(net.parameters(), OptimConfig(lookahead_k=3))
                opt.load_state_dict(osd)
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
        return net.weight.detach()

    torch.testing.assert_close(run(8), run(8, resume_at=4))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(dataset, tmp_path):
    run = tmp_path / "ddp"
    # the full stage: DDP over several truncated-BPTT windows per sequence (the hardest case)
    overrides = {**TINY, "stages.full.steps": 1, "stages.full.batch_size": 1, "stages.full.seq_len": 3,
                 "model.assignment.warmup_train": 1, "eval.enabled": False}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "locis_rl.pretrain", "--stage", "full", "--data", str(dataset), "--run-dir", str(run),
           *_cli_args(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for rank in (0, 1):
        assert f"[pretrain rank {rank}/2] ran 1 steps" in out, out[-3000:]
    assert out.count("finished:") == 1  # only rank 0 reports and writes
    files = sorted(p.name for p in run.iterdir())
    assert files.count("checkpoint.pt") == 1 and "model.pt" in files
    assert not [f for f in files if f.endswith(".tmp")]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2


def test_optimizer_choice():
    from locis_rl.pretrain.config import OptimConfig
    from locis_rl.pretrain.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    plain = build_optimizer(params, OptimConfig(name="adamw", lookahead_alpha=0.0))
    assert isinstance(plain, torch.optim.AdamW)
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(params, OptimConfig(name="sgd"))


def test_first_frame_fraction_starts_that_share_of_windows_at_frame_zero():
    from types import SimpleNamespace

    from locis_rl.pretrain.stages import FullStage

    class Store:  # records the window starts the stage asks for
        frames = 24

        def batch(self, items, start, length):
            self.start, self.length = start, length
            return start

    def starts(fraction: float) -> torch.Tensor:
        cfg = load_train_config("quickstart", {"stages.full.seq_len": 8,
                                               "stages.full.first_frame_fraction": fraction})
        store = Store()
        FullStage.sample(SimpleNamespace(cfg=cfg), store, list(range(2000)), torch.Generator().manual_seed(0))
        assert store.length == 8
        return store.start

    uniform = starts(0.0)
    # 0: the uniform starts of before, from an unchanged random stream (runs resume identically)
    assert torch.equal(uniform, torch.randint(0, 17, (2000,), generator=torch.Generator().manual_seed(0)))
    assert starts(1.0).eq(0).all()
    half = starts(0.5)
    assert 0.45 < half.eq(0).float().mean() < 0.6  # 1/2 + 1/2 * 1/17 start at 0
    with pytest.raises(ConfigError, match="first_frame_fraction"):
        load_train_config("quickstart", {"stages.full.first_frame_fraction": 1.5})
