"""Accelerate integration: the shipped config files and experiment trackers."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from bench.cli.main import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "accelerate_configs").glob("*.yaml"))


def test_every_kind_of_launch_has_a_config():
    assert {p.stem for p in CONFIGS} == {
        "cpu",
        "single_gpu_bf16",
        "single_gpu_fp16",
        "multi_gpu_bf16",
        "multi_node",
        "fsdp",
        "fsdp_cpu_test",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_parses_each_config(path):
    config = load_config_from_file(str(path))
    expected = {
        "cpu": ("NO", "no", 1, 1),
        "single_gpu_bf16": ("NO", "bf16", 1, 1),
        "single_gpu_fp16": ("NO", "fp16", 1, 1),
        "multi_gpu_bf16": ("MULTI_GPU", "bf16", 8, 1),
        "multi_node": ("MULTI_GPU", "bf16", 16, 2),
        "fsdp": ("FSDP", "bf16", 8, 1),
        "fsdp_cpu_test": ("FSDP", "no", 2, 1),
    }[path.stem]
    assert (config.distributed_type.value, config.mixed_precision, config.num_processes, config.num_machines) == expected
    assert config.use_cpu == (path.stem in ("cpu", "fsdp_cpu_test"))
    if expected[0] == "FSDP":  # the harness shards with FSDP2 only
        assert config.fsdp_config["fsdp_version"] == 2


def test_tensorboard_logs_every_epoch_offline(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = [
        "--arch_type",
        "mlp",
        "--sam_type",
        "sam",
        "--epochs",
        "3",
        "--batch_size",
        "64",
        "--log_with",
        "tensorboard",
        "--cpu",
        "--output_dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    (run,) = list(tmp_path.iterdir())
    (events,) = [p for p in (run / "sam-bench").iterdir() if p.name.startswith("events")]
    log = EventAccumulator(str(events))
    log.Reload()
    assert {"test_acc", "train_loss", "lr", "rho"} <= set(log.Tags()["scalars"])
    assert [e.step for e in log.Scalars("test_acc")] == [22, 44, 66]


def test_unknown_tracker_is_one_line(tmp_path, capsys):
    assert main(["--log_with", "nope", "--output_dir", str(tmp_path / "out")]) == 2
    assert "unknown log_with 'nope'; choose one of: tensorboard" in capsys.readouterr().err
