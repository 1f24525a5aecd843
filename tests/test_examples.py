"""Smoke tests: the CleanRL-style examples run end to end as subprocesses with tiny budgets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--checkpoint", "tiny", "--warmup", "2", "--num-envs", "2", "--max-episode-steps", "20",
        "--eval-episodes", "2"]
TIMEOUT_S = 1200  # a hang guard, not a speed check: a loaded 2-core machine can be 10x slower


def run_script(args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_ppo_sb3_push_smoke(tmp_path):
    out = run_script(["examples/ppo_sb3_push.py", *TINY, "--total-timesteps", "256", "--controlled-slot",
                      "--output-dir", str(tmp_path)], tmp_path)
    assert "'controlled': Box(0.0, 1.0" in out  # the cue is among the policy's inputs
    assert "eval/success_rate:" in out
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "policy.zip").is_file()
    assert any(run_dir.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_ppo_torchrl_push_smoke(tmp_path):
    out = run_script(["examples/ppo_torchrl_push.py", *TINY, "--total-frames", "256",
                      "--frames-per-batch", "128", "--output-dir", str(tmp_path)], tmp_path)
    assert "update 2: frames 256" in out
    assert "eval/success_rate:" in out
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "policy.pt").is_file()


@pytest.mark.slow
def test_decode_push_state_smoke(tmp_path):
    out_json = tmp_path / "decode.json"
    out = run_script(["examples/decode_push_state.py", "--checkpoint", "tiny", "--num-envs", "2",
                      "--episodes-per-env", "2", "--steps", "8", "--iterations", "20", "--json-out",
                      str(out_json)], tmp_path)
    assert "| target-pusher dx |" in out and "| goal-target dy |" in out
    import json

    report = json.loads(out_json.read_text())
    assert set(report["r2"]) == {"target-pusher dx", "target-pusher dy", "goal-target dx", "goal-target dy"}
    assert report["train_frames"] == 15 and report["test_frames"] == 5  # whole episodes held out
