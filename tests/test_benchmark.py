"""python -m locis_rl.benchmark segmentation: a smoke run with random-weight tiny checkpoints."""
from __future__ import annotations

import json

from locis_rl.benchmark import heldout_seed, main, training_budget


def test_segmentation_smoke(tmp_path, capsys):
    from locis_rl.model import LociS, LociSConfig
    from locis_rl.savi import SAVi, SAViConfig

    # random weights; 2 warm-up passes instead of tiny's default keep Loci-s fast
    locis = LociS(LociSConfig.preset("tiny").replace(assignment={"warmup_inference": 2}))
    locis_ckpt = locis.save_pretrained(tmp_path / "locis" / "model.pt")
    savi_ckpt = SAVi(SAViConfig.preset("savi-tiny")).save_pretrained(tmp_path / "savi" / "model.pt")
    boxes_ckpt = SAVi(SAViConfig.preset("savi-tiny").replace(conditioning="boxes")).save_pretrained(
        tmp_path / "boxes.pt")
    out = tmp_path / "out"
    rc = main(["segmentation", "--locis", str(locis_ckpt), "--savi", str(savi_ckpt),
               "--savi-conditional", str(boxes_ckpt), "--levels", "a", "--seeds", "0",
               "--episodes", "2", "--frames", "4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--comparison-frames", "3"])
    assert rc == 0
    table = (out / "table.md").read_text()
    assert table.strip() in capsys.readouterr().out  # the CLI prints the table
    for row in ("Loci-s (rnd)", "Loci-s (reg)", "Loci-s (seg)", "SAVi", "SAVi (GT boxes)"):
        assert f"| {row} |" in table, row
    assert "a: mIoU" in table and "a: FG-ARI" in table
    assert (out / "comparison.png").stat().st_size > 0
    from PIL import Image

    width, height = Image.open(out / "comparison.png").size
    assert height > 4 * 128  # input + Loci-s + SAVi + SAVi (GT boxes), 64 px frames at scale 2
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"locis", "savi", "savi-conditional"}
    assert res["heldout_seeds"] == {"0": heldout_seed(0)} == {"0": 100000}
    assert "heldout" in res["data"]["64"]["a"]["0"] and "seed100000" in res["data"]["64"]["a"]["0"]
    cell = res["rows"]["SAVi (GT boxes)"]["a"]["mIoU"]
    assert 0.0 <= cell["mean"] <= 1.0 and cell["std"] == 0.0 and len(cell["per_seed"]) == 1
    assert res["models"]["locis"]["training"] is None  # saved by hand: no run directory


def test_training_budget_reads_a_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "stage": "all", "preset": "savi-gpu-budget", "model_family": "savi",
        "stages": {"savi": {"steps": 100000, "max_minutes": 5.2, "batch_size": 16, "lr_scale": 1.0},
                   "full": {"steps": 3}}}))
    (run / "metrics.json").write_text(json.dumps({"global_step": 1234}))
    budget = training_budget(run / "model.pt")
    assert budget["global_step"] == 1234 and budget["preset"] == "savi-gpu-budget"
    assert budget["stages"] == {"savi": {"steps": 100000, "max_minutes": 5.2, "batch_size": 16}}
    assert budget["wall_clock_seconds"] is None  # no event file
    assert training_budget(tmp_path / "nowhere" / "model.pt") is None
