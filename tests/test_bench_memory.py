"""``python -m locis_rl.bench memory``: the slope / verdict rule on synthetic series and a short CPU run."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from locis_rl.bench import (MEMORY_CSV_COLUMNS, build_parser, least_squares_slope, main, memory_verdict,
                            process_rss_mb)

STEPS = np.linspace(0, 100_000, 50)
WARMUP = 5_000


def test_least_squares_slope_recovers_a_line_and_rejects_degenerate_input():
    x = np.arange(20.0)
    assert least_squares_slope(x, 3.0 * x - 7.0) == pytest.approx(3.0)
    assert least_squares_slope(x, np.full(20, 5.0)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="distinct"):
        least_squares_slope([1.0, 1.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="length"):
        least_squares_slope([1.0, 2.0], [2.0])


def test_memory_verdict_flat_series_with_jitter_and_warmup_jump_is_no_growth():
    rng = np.random.default_rng(0)
    rss = 800.0 + rng.normal(0.0, 2.0, STEPS.size)
    rss[STEPS < WARMUP] -= 150.0  # allocator caches filling up: ignored
    fit = memory_verdict(STEPS, rss, warmup_steps=WARMUP)
    assert fit["verdict"] == "no growth"
    assert abs(fit["slope_mb_per_1e4_steps"]) < 0.5
    assert fit["fitted_samples"] == int((STEPS >= WARMUP).sum()) == 47
    assert fit["first_mb"] == pytest.approx(rss[0]) and fit["max_mb"] == pytest.approx(rss.max())
    assert fit["first_after_warmup_mb"] == pytest.approx(rss[3]) and fit["last_mb"] == pytest.approx(rss[-1])


def test_memory_verdict_linear_leak_is_growth_with_the_right_slope():
    rss = 800.0 + 5.0 * STEPS / 1e4  # 5 MB per 10^4 steps
    fit = memory_verdict(STEPS, rss, warmup_steps=WARMUP)
    assert fit["verdict"] == "growth"
    assert fit["slope_mb_per_1e4_steps"] == pytest.approx(5.0)
    assert fit["intercept_mb"] == pytest.approx(800.0)
    # A slope just under the threshold with < 2 % growth passes; the % rule catches a late jump.
    assert memory_verdict(STEPS, 800.0 + 0.9 * STEPS / 1e4, warmup_steps=WARMUP)["verdict"] == "no growth"
    jump = np.full(STEPS.size, 800.0)
    jump[-1] = 820.0  # +2.5 %, slope ~0.1 MB / 10^4
    fit = memory_verdict(STEPS, jump, warmup_steps=WARMUP)
    assert fit["slope_mb_per_1e4_steps"] < 1.0 and fit["growth_pct"] == pytest.approx(2.5)
    assert fit["verdict"] == "growth"
    with pytest.raises(ValueError, match="at least 2 samples"):
        memory_verdict(STEPS, jump, warmup_steps=STEPS[-1])


def test_process_rss_and_parser_defaults():
    assert 10.0 < process_rss_mb() < 1e6
    args = build_parser().parse_args(["memory"])
    assert (args.steps, args.num_envs, args.samples, args.checkpoint) == (100_000, 8, 50, "tiny")
    assert args.warmup_fraction == 0.05 and callable(args.func)


def test_memory_subcommand_short_run_writes_csv_png_json(tmp_path, capsys):
    out, path = tmp_path / "mem", tmp_path / "result.json"
    # 60 vector steps: ~20 s on a loaded 2-core machine; episodes of 10 / 11 steps end apart.
    assert main(["memory", "--steps", "120", "--num-envs", "2", "--samples", "6", "--checkpoint", "tiny",
                 "--device", "cpu", "--warmup", "2", "--max-steps", "10", "--out", str(out), "--json",
                 str(path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "60 vector steps = 120 env steps" in text and "MB per 10^4 env steps" in text
    assert text.splitlines()[-2] in ("verdict: growth", "verdict: no growth")
    with open(out / "memory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == MEMORY_CSV_COLUMNS and len(rows) == 6
    assert [int(r["env_step"]) for r in rows][::5] == [0, 120]
    assert all(float(r["rss_mb"]) > 0 and r["cuda_allocated_mb"] == "" for r in rows)
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    result = json.loads(path.read_text())
    assert result == json.loads((out / "memory.json").read_text())
    assert result["verdict"] in ("growth", "no growth") and result["cuda"] is None
    assert result["episode_lengths"] == [10, 11]
    assert result["episodes"] >= 8 and result["partial_resets"] >= 1  # rows reset apart
    assert result["rss"]["fitted_samples"] == 5
