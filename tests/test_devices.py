"""Every entry point takes the same device strings and rejects a device torch cannot use before any work."""
from __future__ import annotations

import pytest
import torch

from locis_rl import bench, benchmark, evaluate, probe
from locis_rl.devices import cli_device, resolve_device
from locis_rl.model.config import ConfigError
from locis_rl.pretrain.config import TrainConfig
from locis_rl.pretrain.run import _Dist
from locis_rl.rl import compare


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_is_the_cpu_without_a_gpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert cli_device("auto") == "cpu"


def test_cli_device_exits_2_with_the_reason(no_cuda, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_device("cuda", flag="--device")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "sees no CUDA device" in err and "'auto'" in err


@pytest.mark.parametrize("main, argv", [
    (evaluate.main, ["--checkpoint", "default", "--data", "missing.h5"]),
    (probe.main, []),
    (compare.main, ["--inputs", "state"]),
    (benchmark.main, ["segmentation", "--locis", "default", "--savi", "savi.pt", "--out", "unused"]),
    (bench.main, ["model"]),
], ids=["evaluate", "probe", "compare", "benchmark", "bench"])
def test_command_lines_reject_cuda_without_a_gpu_before_any_work(main, argv, no_cuda, capsys, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--device", "cuda"])
    assert exc.value.code == 2
    assert "sees no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_pretrain_rejects_cuda_without_a_gpu_as_a_config_error(no_cuda):
    with pytest.raises(ConfigError, match="sees no CUDA device.*device="):
        _Dist(TrainConfig(device="cuda"))


def test_pretrain_auto_is_the_cpu_without_a_gpu(no_cuda):
    assert _Dist(TrainConfig(device="auto")).device == torch.device("cpu")


def test_pretrain_rank_beyond_the_gpus_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="sees 1 CUDA device.*LOCAL_RANK=1"):
        _Dist(TrainConfig(device="cuda"))
