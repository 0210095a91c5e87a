"""Sharded models (FSDP2) on two CPU processes with gloo.

- every sharpness-aware variant, sharded, takes the steps of one unsharded process on the whole
  batch, through a checkpoint round trip (scripts/fsdp_check.py, the GPU check's script, on CPU);
- the harness under ``accelerate launch --config_file accelerate_configs/fsdp_cpu_test.yaml``
  trains, evaluates, exports and resumes as one process on the whole batch does;
- what cannot run sharded is refused in one line.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import KILLED_AFTER
from safetensors.torch import load_file

from architectures import create_model
from bench.cli.main import main
from bench.config import ConfigError, RunConfig
from bench.io import read_json, read_jsonl
from bench.loop.sharding import check_sharded_run, fsdp_plugin
from bench.resolve import optimizer_settings
from optimizers import SharpnessAwareOptimizer, available_optimizers, create_optimizer, optimizer_class

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "accelerate_configs" / "fsdp_cpu_test.yaml"
TIMING = ("epoch_time_s", "images_per_s", "step_time_mean_s")


def _fsdp2_on_cpu() -> str:
    """Why two CPU processes cannot run FSDP2 here ('' when they can)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "this torch has no torch.distributed with gloo"
    if importlib.util.find_spec("torch.distributed.fsdp") is None:
        return "this torch has no torch.distributed.fsdp"
    from torch.distributed import fsdp

    return "" if hasattr(fsdp, "fully_shard") else f"torch {torch.__version__} has no FSDP2 (fully_shard)"


requires_fsdp2 = pytest.mark.skipif(bool(_fsdp2_on_cpu()), reason=_fsdp2_on_cpu() or "FSDP2 available")


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_fsdp(script: str, args: list[str], out: Path, env: dict | None = None, check: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG),
        "--main_process_port",
        str(free_port()),
        script,
        "--cpu",
        *args,
        "--output_dir",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, done.stderr[-6000:]
    return done


def one_process(args: list[str], out: Path) -> Path:
    assert main([*args, "--cpu", "--output_dir", str(out)]) == 0
    (run,) = list(out.iterdir())
    return run


def assert_close(a: dict, b: dict, rtol: float):
    assert a.keys() == b.keys()
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        err = ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item()
        assert err < rtol, f"{k}: relative error {err:.1e}"


# -- the optimizers ------------------------------------------------------------------------------


@requires_fsdp2
def test_every_variant_sharded_takes_the_unsharded_steps():
    """float64, tolerance 1e-10: reductions, every variant on an MLP (with a checkpoint round trip),
    five on a BatchNorm CNN with cross-process statistics."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "scripts/fsdp_check.py",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    failed = [line for line in lines if line.startswith("FAIL")]
    assert done.returncode == 0 and not failed, "\n".join(failed) or done.stderr[-3000:]
    family = [n for n in available_optimizers() if issubclass(optimizer_class(n), SharpnessAwareOptimizer)]
    shardable = [n for n in family if not optimizer_class(n).sharding_unsupported]
    assert [line.split(":")[0] for line in lines if line.startswith("PASS mlp/")] == [f"PASS mlp/{n}" for n in shardable]
    assert sum(line.startswith("PASS cnn/") for line in lines) == 5
    clipped = [n for n in shardable if optimizer_class(n).clips_descent]
    assert [line.split(":")[0] for line in lines if line.startswith("PASS clip/")] == [f"PASS clip/{n}" for n in clipped]
    assert [line.split(":")[0] for line in lines if line.startswith("SKIP")] == ["SKIP mlp/mesa"]
    assert lines[0].startswith("PASS reductions")


# -- the harness ---------------------------------------------------------------------------------

FLAGS = [
    "--arch_type",
    "mlp",
    "--epochs",
    "1",
    "--max_steps",
    "3",
    "--batch_size",
    "64",
    "--schedule",
    "constant",
    "--lr",
    "0.1",
    "--ascent_sync",
    "global",
]


@requires_fsdp2
def test_fsdp_launch_equals_one_process_on_the_whole_batch(tmp_path):
    """GSAM, sharded over two processes: the weights, metrics and files of one process on the whole batch;
    the exported model is the plain model's state dict, and sharpness is measured on it."""
    args = [*FLAGS, "--sam_type", "gsam", "--sharpness"]
    launch_fsdp("launch.py", args, tmp_path / "fsdp")
    (sharded,) = list((tmp_path / "fsdp").iterdir())
    single = one_process(args, tmp_path / "one")
    assert read_json(sharded / "config.json")["world_size"] == 2
    assert_close(load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors"), rtol=1e-6)
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    row, expected = read_jsonl(sharded / "metrics.jsonl")[-1], read_jsonl(single / "metrics.jsonl")[-1]
    assert row.keys() == expected.keys()
    assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert row["test_acc"] == pytest.approx(expected["test_acc"], abs=1 / 360)
    assert set(read_json(sharded / "sharpness.json")) == set(read_json(single / "sharpness.json"))
    # the checkpoint holds the whole model, in the file an unsharded run writes
    (checkpoint,) = list((sharded / "checkpoints").iterdir())
    create_model("mlp", num_classes=10, in_channels=1).load_state_dict(load_file(checkpoint / "model.safetensors"))


@requires_fsdp2
def test_fsdp_run_killed_and_resumed_equals_one_process(tmp_path):
    """SAM on a BatchNorm CNN (--sync_bn: statistics over both shards), killed after step 3 with a
    checkpoint at step 2, resumed: the weights and BatchNorm statistics of one uninterrupted process."""
    args = [
        "--arch",
        "smallcnn",
        "--epochs",
        "1",
        "--max_steps",
        "5",
        "--batch_size",
        "48",
        "--schedule",
        "constant",
        "--lr",
        "0.05",
        "--sam_type",
        "sam",
        "--ascent_sync",
        "global",
        "--sync_bn",
        "--save_every_steps",
        "2",
    ]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER)
    killed = launch_fsdp(str(script), args, tmp_path / "fsdp", env={"KILL_AFTER": "3"}, check=False)
    assert killed.returncode != 0
    (run,) = list((tmp_path / "fsdp").iterdir())
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"] and not (run / "summary.json").exists()
    launch_fsdp("launch.py", [*args, "--resume", "auto"], tmp_path / "fsdp")
    assert read_json(run / "summary.json")["steps"] == 5
    single = one_process(args, tmp_path / "one")
    assert_close(load_file(run / "model.safetensors"), load_file(single / "model.safetensors"), rtol=1e-5)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    resumed, whole = strip(read_jsonl(run / "metrics.jsonl"))[0], strip(read_jsonl(single / "metrics.jsonl"))[0]
    assert resumed.keys() == whole.keys()
    # each process's running sums of the epoch were checkpointed with it: the epoch's training metrics are the
    # whole batch's, as one process counts them
    assert resumed["train_acc"] == pytest.approx(whole["train_acc"], abs=1e-9)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)


# -- refusals ------------------------------------------------------------------------------------


def build(name: str):
    return create_optimizer(name, [torch.zeros(2, requires_grad=True)], **optimizer_settings(RunConfig(optimizer=name), 10))


@pytest.mark.parametrize(
    "name, sync, message",
    [
        ("sam", "local", "--ascent_sync local cannot be honoured under FSDP"),
        ("esam", "global", "esam cannot train a sharded model (FSDP): its ascent gradient must stay per process"),
        ("esam", "local", "esam cannot train a sharded model (FSDP): its ascent gradient must stay per process"),
        ("mesa", "global", "mesa cannot train a sharded model (FSDP): its EMA teacher is a whole, unsharded copy"),
    ],
)
def test_what_cannot_run_sharded_is_refused_in_one_line(name, sync, message):
    opt = build(name)
    with pytest.raises(ConfigError) as err:
        check_sharded_run(name, opt, sync)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, sync", [("sam", "global"), ("gsam", "local"), ("looksam", "local"), ("sgd", "local")])
def test_what_can_run_sharded_passes(name, sync):
    """GSAM and LookSAM always all-reduce their ascent gradient; plain SGD has no ascent pass."""
    check_sharded_run(name, build(name), sync)


def test_fsdp1_is_refused_in_one_line(monkeypatch):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class Launch:  # what an accelerator under an FSDP1 launch config reports
        distributed_type = DistributedType.FSDP
        state = type("State", (), {"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=1)})()

    with pytest.raises(ConfigError, match="^the harness shards with FSDP2 only") as err:
        fsdp_plugin(Launch())
    assert "\n" not in str(err.value)


def test_the_unsharded_export_of_a_loader_dataset_run(monkeypatch):
    """A sharded run on an image folder (no in-memory images) exports its whole model: the copy is built from the
    dataset's declared channels and classes."""
    from types import SimpleNamespace

    import numpy as np

    from bench.data.folders import FolderSplit
    from bench.loop import finish

    trained = create_model("smallcnn", num_classes=3, in_channels=3)
    monkeypatch.setattr(finish.sharding, "full_model_state", lambda model: model.state_dict())
    folders = FolderSplit(
        root="/nowhere", files=np.array(["a.png"] * 3, dtype=object), labels=torch.tensor([0, 1, 2]), classes=("a", "b", "c")
    )
    run = SimpleNamespace(
        optimizer=torch.optim.SGD(trained.parameters(), lr=0.1),
        model=trained,
        accelerator=SimpleNamespace(is_main_process=True),
        config=RunConfig(arch="smallcnn"),
        train_set=folders,
    )
    copy = finish.unsharded_model(run)
    assert copy is not trained and copy.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), trained.state_dict().values()))
