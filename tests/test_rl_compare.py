"""The RL comparison runner (``python -m locis_rl.rl.compare``) and ``python -m locis_rl.bench wrapper``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locis_rl.rl.compare import PPOConfig, main, markdown_table, summarise

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1200  # a hang guard, not a speed check: a loaded 2-core machine can be 10x slower
SMOKE = ["--timesteps", "128", "--seeds", "0", "--num-envs", "2", "--checkpoint", "tiny", "--eval-episodes", "2",
         "--eval-every", "64", "--warmup", "2", "--max-episode-steps", "20", "--eval-distractors", "3"]
RUN_KEYS = {"input", "seed", "steps", "success", "final_success", "num_timesteps", "train_seconds",
            "steps_per_second", "model", "distractors"}


def run_module(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_compare_smoke_outputs_and_resume(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    check(run_module(["locis_rl.rl.compare", *SMOKE, "--out", str(out_dir)]))
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results) >= {"version", "settings", "runs", "summary"}
    assert set(results["runs"]) == {"slots_seed0", "pixels_seed0", "state_seed0", "oracle_slots_seed0"}
    for run in results["runs"].values():
        assert set(run) >= RUN_KEYS
        assert run["steps"][0] == 0 and run["steps"][-1] == run["num_timesteps"] == 128
        assert len(run["success"]) == len(run["steps"]) and 0.0 <= run["final_success"] <= 1.0
        assert set(run["distractors"]) == {"3"}
        assert (out_dir / run["model"]).is_file()
    assert set(results["summary"]) >= {"slots", "pixels", "state", "oracle_slots", "oracle_final"}
    for name in ("learning_curves.png", "distractors.png", "results.md"):
        assert (out_dir / name).stat().st_size > 0
    assert any((out_dir / "tb").rglob("events.out.tfevents.*"))

    # Resume (in process): nothing is retrained; a new distractor count only re-evaluates the
    # saved state policy.
    before = {k: (out_dir / r["model"]).stat().st_mtime_ns for k, r in results["runs"].items()}
    smoke = SMOKE[:-1] + ["3", "5"]
    assert main([*smoke, "--inputs", "state", "--out", str(out_dir)]) == 0
    assert "1 already in" in capsys.readouterr().out
    again = json.loads((out_dir / "results.json").read_text())
    assert again["runs"]["state_seed0"]["steps"] == results["runs"]["state_seed0"]["steps"]
    assert set(again["runs"]["state_seed0"]["distractors"]) == {"3", "5"}
    assert {k: (out_dir / r["model"]).stat().st_mtime_ns for k, r in again["runs"].items()} == before

    # Settings that change training must match the file.
    with pytest.raises(SystemExit, match="other settings"):
        main([*SMOKE[2:], "--timesteps", "64", "--inputs", "state", "--out", str(out_dir)])


def test_interrupted_run_resumes_from_its_mid_run_checkpoint(tmp_path, monkeypatch, capsys):
    """A run killed between rollouts continues from ``partial/``: its curve and step count go on."""
    from locis_rl.rl import compare

    out_dir = tmp_path / "cmp"
    # 2 envs x 16 steps: four 32-step rollouts in the 128-step budget, a checkpoint after each
    argv = [*SMOKE, "--seeds", "3", "--inputs", "state", "--ppo", "n_steps=16", "--eval-every", "32",
            "--save-every", "32", "--out", str(out_dir)]
    original = compare.SuccessCurveCallback._on_rollout_start

    def die_after_the_second_checkpoint(self):
        original(self)
        if self.num_timesteps >= 64:
            raise KeyboardInterrupt  # what a killed process leaves behind: only files on disk

    monkeypatch.setattr(compare.SuccessCurveCallback, "_on_rollout_start", die_after_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    progress = json.loads((out_dir / "partial" / "state_seed3.json").read_text())
    assert progress["num_timesteps"] == 64 and progress["steps"] == [0, 32, 64]
    assert (out_dir / "partial" / "state_seed3.zip").is_file()
    assert not (out_dir / "results.json").exists() or "state_seed3" not in json.loads(
        (out_dir / "results.json").read_text())["runs"]

    monkeypatch.setattr(compare.SuccessCurveCallback, "_on_rollout_start", original)
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "1 resumed from a mid-run checkpoint" in out.out
    assert "resuming at 64 env steps" in out.out + out.err
    run = json.loads((out_dir / "results.json").read_text())["runs"]["state_seed3"]
    assert run["num_timesteps"] == 128 and run["resumes"] == 1
    assert run["steps"] == [0, 32, 64, 96, 128] and run["steps"][:3] == progress["steps"]
    assert run["success"][:3] == progress["success"]
    assert run["train_seconds"] >= progress["train_seconds"]
    assert not (out_dir / "partial" / "state_seed3.zip").exists()  # complete: the mid-run state is gone


def test_mid_run_checkpoint_by_default_after_every_rollout(tmp_path, monkeypatch):
    """Without ``--save-every`` a kill loses at most one rollout, however far apart the evaluations."""
    from locis_rl.rl import compare

    out_dir = tmp_path / "cmp"
    argv = [*SMOKE, "--seeds", "4", "--inputs", "state", "--ppo", "n_steps=16", "--eval-every", "1000",
            "--out", str(out_dir)]
    original = compare.SuccessCurveCallback._on_rollout_start

    def die_at_the_third_rollout(self):
        original(self)
        if self.num_timesteps >= 64:
            raise KeyboardInterrupt

    monkeypatch.setattr(compare.SuccessCurveCallback, "_on_rollout_start", die_at_the_third_rollout)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    progress = json.loads((out_dir / "partial" / "state_seed4.json").read_text())
    assert progress["num_timesteps"] == 64  # 2 rollouts of 2 envs x 16 steps, both kept
    assert progress["steps"] == [0] and progress["next_eval"] == 1000


def test_parallel_invocations_sharing_an_out_folder_keep_each_others_runs(tmp_path):
    from locis_rl.rl.compare import save_json

    path = str(tmp_path / "results.json")
    slots = {"version": 1, "settings": {}, "runs": {"slots_seed0": {"final_success": 0.5}}}
    pixels = {"version": 1, "settings": {}, "runs": {"pixels_seed0": {"final_success": 0.25}}}
    save_json(slots, path)
    save_json(pixels, path)  # loaded before slots_seed0 was saved: must not drop it
    on_disk = json.loads(Path(path).read_text())["runs"]
    assert on_disk == {"slots_seed0": {"final_success": 0.5}, "pixels_seed0": {"final_success": 0.25}}
    pixels["runs"]["pixels_seed0"]["final_success"] = 0.75  # its own runs: the newer value wins
    save_json(pixels, path)
    assert json.loads(Path(path).read_text())["runs"]["pixels_seed0"]["final_success"] == 0.75


def test_compare_missing_checkpoint_gives_the_library_error(tmp_path):
    with pytest.raises(SystemExit, match="no Loci-s checkpoint"):
        main(["--inputs", "slots", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])


def test_slot_count_reaches_the_wrapper_and_is_a_training_setting(tmp_path):
    from locis_rl.rl.compare import load_locis, make_venv

    model = load_locis("tiny", warmup=2, num_slots=3)
    assert model.config.num_slots == 3 and model.config.assignment.warmup_inference == 2
    import torch

    from locis_rl.model import LociS

    torch.manual_seed(3)
    from_global_rng = load_locis("tiny", seed=None)  # the examples' tiny weights follow their --seed
    torch.manual_seed(3)
    reference = LociS("tiny")
    for got, expected in zip(from_global_rng.parameters(), reference.parameters()):
        assert torch.equal(got, expected)
    venv = make_venv("slots", 1, seed=0, max_steps=5, locis=model, device="cpu")
    try:
        assert venv.observation_space["gestalt"].shape[0] == 3
    finally:
        venv.close()
    with pytest.raises(SystemExit, match="--num-slots"):
        main(["--num-slots", "-1", "--out", str(tmp_path)])
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"num_slots": 6}, "runs": {}}))
    with pytest.raises(SystemExit, match="num_slots: 6 in the file, 8 now"):
        main(["--inputs", "state", "--out", str(tmp_path)])


def test_ppo_config_clips_rollout_to_budget_and_parses_overrides():
    kwargs = PPOConfig().sb3_kwargs(timesteps=256, num_envs=2)
    assert kwargs["n_steps"] == 128 and kwargs["batch_size"] == 256 and kwargs["gamma"] == 0.99
    assert PPOConfig.from_overrides(["n_steps=64", "learning_rate=1e-4"]).learning_rate == 1e-4
    with pytest.raises(ValueError, match="KEY=VALUE"):
        PPOConfig.from_overrides(["nsteps=64"])


def test_summary_steps_to_oracle_and_table():
    def run(name, seed, success, distractors):
        return {"input": name, "seed": seed, "steps": [0, 10, 20], "success": success,
                "final_success": success[-1], "distractors": distractors}

    runs = {"state_seed0": run("state", 0, [0.0, 0.8, 0.9], {"3": 0.9, "6": 0.8}),
            "state_seed1": run("state", 1, [0.0, 0.9, 0.9], {"3": 0.9, "6": 0.7}),
            "slots_seed0": run("slots", 0, [0.0, 0.5, 0.95], {"3": 0.9}),
            "pixels_seed0": run("pixels", 0, [0.0, 0.1, 0.2], {"3": 0.2})}
    summary = summarise(runs)
    assert summary["oracle_final"] == pytest.approx(0.9)
    assert summary["state"]["steps_to_oracle"] == 20
    assert summary["slots"]["steps_to_oracle"] == 20
    assert summary["pixels"]["steps_to_oracle"] is None
    assert summary["state"]["success_mean"] == pytest.approx([0.0, 0.85, 0.9])
    assert summary["state"]["distractors"]["6"]["mean"] == pytest.approx(0.75)
    table = markdown_table(summary, {"timesteps": 20, "num_envs": 2, "train_distractors": 3,
                                     "checkpoint": "tiny", "eval_episodes": 2})
    assert "| pixels | 1 | 0.200 +- 0.000 | not reached |" in table
    assert "| slots | 0.900 +- 0.000 | - |" in table


def test_progress_report_shows_unfinished_runs_from_their_mid_run_checkpoints(tmp_path, capsys):
    report_args = [*SMOKE, "--inputs", "slots", "state", "--out", str(tmp_path), "--progress-report"]
    with pytest.raises(SystemExit, match="no finished run"):
        main(report_args)
    assert main([*SMOKE, "--inputs", "state", "--out", str(tmp_path)]) == 0  # one finished run
    state_final = json.loads((tmp_path / "results.json").read_text())["runs"]["state_seed0"]["final_success"]
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "slots_seed0.zip").write_bytes(b"policy")
    (tmp_path / "partial" / "slots_seed0.json").write_text(json.dumps(
        {"num_timesteps": 80, "steps": [0, 64], "success": [0.0, 0.5], "next_eval": 128}))
    capsys.readouterr()
    assert main(report_args) == 0
    report = (tmp_path / "progress.md").read_text()
    assert capsys.readouterr().out.strip() == report.strip()
    assert "| slots | 1 | 0.500 +- 0.000 |" in report  # the last evaluation so far
    assert f"| state | 1 | {state_final:.3f} +- 0.000 |" in report
    assert "slots_seed0 at 80 env steps" in report
    assert (tmp_path / "learning_curves_progress.png").stat().st_size > 0
    assert (tmp_path / "partial" / "slots_seed0.json").exists()  # nothing was trained or cleaned up


def test_bench_wrapper_smoke(tmp_path):
    path = tmp_path / "bench.json"
    out = check(run_module(["locis_rl.bench", "wrapper", "--checkpoint", "tiny", "--steps", "5", "--warmup", "2",
                            "--num-envs", "1", "2", "--json", str(path), "--quiet"]))
    assert "overhead ms/step" in out
    rows = json.loads(path.read_text())
    assert [(r["num_envs"], r["vector"]) for r in rows] == [(1, "none"), (2, "sync")]
    assert all(r["raw_steps_per_s"] > 0 and r["wrapped_steps_per_s"] > 0 for r in rows)


def test_oracle_slots_hold_the_true_positions_in_a_new_order_each_episode():
    import numpy as np

    from locis_rl.rl.compare import ORACLE_KINDS, OracleSlots, make_venv

    venv = make_venv("oracle_slots", 2, seed=3, max_steps=3, oracle_slots=6)
    assert isinstance(venv, OracleSlots) and venv.observation_space["gestalt"].shape == (6, len(ORACLE_KINDS))
    state_venv = make_venv("state", 2, seed=3, max_steps=3)  # same seeds: the same scenes
    obs, state = venv.reset(), state_venv.reset()
    first_order = venv._order.copy()
    for row in range(2):
        assert venv.observation_space.contains({k: v[row] for k, v in obs.items()})
        kind = obs["gestalt"][row].argmax(-1)
        present = obs["presence"][row] > 0.5
        assert sorted(kind[present].tolist()) == [0, 1, 2, 3, 3, 3]  # 3 distractors, 6 slots
        for k, (lo, hi) in zip(range(3), [(0, 2), (4, 6), (8, 10)]):  # pusher, target, goal
            np.testing.assert_allclose(obs["position"][row][kind == k][0, :2], state[row, lo:hi], atol=1e-6)
    first = obs
    for _ in range(3):  # the episodes end (max_steps=3): terminal slots in the old order, then a new one
        obs, _, dones, infos = venv.step(np.zeros((2, 2), np.float32))
    assert dones.all()
    for row in range(2):
        terminal = infos[row]["terminal_observation"]
        assert set(terminal) == {"gestalt", "position", "depth", "presence"}
        np.testing.assert_array_equal(terminal["gestalt"], first["gestalt"][row])
    assert not np.array_equal(venv._order, first_order)
    with pytest.raises(ValueError, match="state_distractors"):
        OracleSlots(state_venv, num_slots=8)
    with pytest.raises(SystemExit, match="at least 3 slots"):
        main(["--inputs", "oracle_slots", "--num-slots", "2", "--timesteps", "8", "--out", "unused"])


def test_controlled_slot_cue_marks_the_oracle_pusher_and_is_a_training_setting(tmp_path):
    import dataclasses

    import numpy as np

    from locis_rl.rl.compare import ORACLE_KINDS, PPOConfig, make_venv

    venv = make_venv("oracle_slots", 2, seed=4, max_steps=50, oracle_slots=6, controlled_slot=True)
    venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(6):
        obs, *_ = venv.step(rng.uniform(-1, 1, (2, 2)).astype(np.float32))
    pusher = obs["gestalt"].argmax(-1) == ORACLE_KINDS.index("pusher")        # [N, K]
    np.testing.assert_array_equal(obs["controlled"], pusher.astype(np.float32))
    with pytest.raises(ValueError, match="only for the slot inputs"):
        make_venv("state", 1, seed=0, controlled_slot=True)
    # results files from before the setting existed were written without the cue
    (tmp_path / "results.json").write_text(json.dumps({"settings": {
        "timesteps": 8, "num_envs": 1, "checkpoint": "default", "train_distractors": 3, "max_episode_steps": 100,
        "eval_every": 4, "eval_episodes": 1, "warmup": 0, "num_slots": 8,
        "ppo": dataclasses.asdict(PPOConfig())}, "runs": {}}))
    with pytest.raises(SystemExit, match="controlled_slot: False in the file, True now"):
        main(["--inputs", "oracle_slots", "--timesteps", "8", "--num-envs", "1", "--eval-every", "4",
              "--eval-episodes", "1", "--controlled-slot", "--out", str(tmp_path)])
