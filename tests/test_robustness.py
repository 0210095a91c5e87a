"""Crash-safe resume, gradient accumulation, non-finite steps, mixed precision, bad input."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import KILLED_AFTER
from safetensors.torch import load_file
from torch import nn

from bench.cli.main import main
from bench.config import RunConfig
from bench.io import read_json, read_jsonl
from bench.loop.precision import LossScaler
from bench.loop.step import TrainClosure, take_step
from bench.loop.train import train
from optimizers import available_optimizers, create_optimizer
from optimizers.regularizer import build_regularizer
from optimizers.tensors import GradientCheck

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("epoch_time_s", "images_per_s", "step_time_mean_s")
VARIANTS = [n for n in available_optimizers() if n not in ("sgd", "adam", "adamw")]


def only_run(path: Path) -> Path:
    (run,) = [p for p in path.iterdir() if p.is_dir()]
    return run


def assert_same_model(a: Path, b: Path):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name", ["sam", "looksam", "friendly_sam"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_result(name, tmp_path):
    flags = ["--sam_type", name, "--epochs", "2", "--batch_size", "64", "--save_every_steps", "4", "--cpu"]
    assert main(flags + ["--output_dir", str(tmp_path / "whole")]) == 0

    killed = flags + ["--output_dir", str(tmp_path / "killed")]
    env = {**os.environ, "KILL_AFTER": "30"}  # 22 steps per epoch: step 30 is mid-epoch 2, last checkpoint at 28
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER, *killed], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    run = only_run(tmp_path / "killed")
    assert not (run / "summary.json").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000024", "step_00000028"]

    assert main(killed + ["--resume", "auto"]) == 0
    whole = only_run(tmp_path / "whole")
    assert_same_model(whole, run)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_jsonl(whole / "metrics.jsonl")) == strip(read_jsonl(run / "metrics.jsonl"))
    # the wall time sums the segment before the kill (up to its last checkpoint) and the resumed one
    summary = read_json(run / "summary.json")
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0


def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys):
    flags = [
        "--sam_type",
        "sam",
        "--epochs",
        "1",
        "--batch_size",
        "64",
        "--save_every_steps",
        "5",
        "--cpu",
        "--output_dir",
        str(tmp_path),
    ]
    assert main(flags) == 0
    capsys.readouterr()
    run = only_run(tmp_path)
    uninterrupted = (run / "model.safetensors").read_bytes()
    older, latest = sorted((run / "checkpoints").iterdir())
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # one bit flipped, same size
    (run / "summary.json").unlink()  # as if the process had died after that checkpoint
    assert main(flags + ["--resume", "auto"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "damaged" in line]
    assert len(notes) == 1 and latest.name in notes[0] and "model.safetensors does not match its SHA-256" in notes[0]
    assert f"resumed from {older.name}" in err
    assert (run / "model.safetensors").read_bytes() == uninterrupted  # the same result as the uninterrupted run


def test_no_intact_checkpoint_is_one_error_line(tmp_path, capsys):
    flags = ["--arch", "mlp", "--epochs", "1", "--batch_size", "64", "--save_every_steps", "5", "--cpu"]
    assert main([*flags, "--output_dir", str(tmp_path)]) == 0
    run = only_run(tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "trainer_state.pt").write_bytes(b"x")
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main([*flags, "--output_dir", str(tmp_path), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "no intact checkpoint is left" in err
    assert err.count("trainer_state.pt does not match its SHA-256") == 2


@pytest.mark.parametrize("name", ["sam", "gsam"])
def test_gradient_accumulation_equals_the_larger_batch(name, tmp_path):
    runs = []
    for accum in (1, 2):
        config = RunConfig(
            arch="mlp",
            optimizer=name,
            epochs=1,
            batch_size=64,
            grad_accum_steps=accum,
            max_steps=8,
            cpu=True,
            output_dir=str(tmp_path / f"a{accum}"),
        )
        runs.append(train(config).run_dir)
    wa, wb = (load_file(r / "model.safetensors") for r in runs)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-6), k


def _injecting_loss(fail_on_pass: int, value: float):
    calls = 0

    def loss_fn(outputs, targets):
        nonlocal calls
        calls += 1
        losses = nn.functional.cross_entropy(outputs, targets, reduction="none")
        return losses * value if calls == fail_on_pass else losses

    return loss_fn


@pytest.mark.parametrize("fail_on_pass", [1, 2])
@pytest.mark.parametrize("fp16", [False, True])
def test_a_non_finite_pass_skips_the_step_with_weights_restored(fail_on_pass, fp16):
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = create_optimizer("sam", model, lr=0.1, momentum=0.9)
    scaler = LossScaler(init_scale=1024.0) if fp16 else None
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    closure = TrainClosure(
        model,
        _injecting_loss(fail_on_pass, float("nan")),
        x,
        y,
        accelerator=Accelerator(cpu=True),
        ascent_sync="local",
        scaler=scaler,
    )
    assert take_step(opt, closure)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert model[2].track_running_stats
    if fp16:
        scaler.update(skipped=True)
        assert scaler.scale == 512.0
    # the next step goes through
    closure = TrainClosure(
        model, _injecting_loss(0, 1.0), x, y, accelerator=Accelerator(cpu=True), ascent_sync="local", scaler=scaler
    )
    assert not take_step(opt, closure)
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before)


#: settings under which every pass kind of the variant runs within the test's four steps
SHORT = {"looksam": {"k": 2}, "look_layer_sam": {"k": 2}, "lookbehind_sam": {"k_steps": 2}, "bsam": {"msharpness": 2}}


@pytest.mark.parametrize("name", available_optimizers())
def test_fp16_loss_scaling_changes_no_step_of_any_optimizer(name):
    """The loss scale is a power of two, so scaled-then-unscaled gradients are the true ones: four
    steps with the scaler give the weights of four without. ESAM switches requires_grad between its
    passes; the gradients of every pass must be unscaled all the same."""
    from accelerate import Accelerator

    weights = []
    for scaler in (None, LossScaler(init_scale=2.0**10)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        seeded = {} if name in ("sgd", "adam", "adamw") else {"seed": 0}
        opt = create_optimizer(name, model, lr=0.1, **seeded, **SHORT.get(name, {}))
        regularizer = build_regularizer(opt, model, num_train=32, num_classes=3, device=torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x, y = torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            closure = TrainClosure(
                model,
                nn.CrossEntropyLoss(reduction="none"),
                x,
                y,
                accelerator=Accelerator(cpu=True),
                ascent_sync="local",
                scaler=scaler,
                sample_ids=torch.arange(8) + 8 * step,
                regularizer=regularizer,
            )
            assert not take_step(opt, closure)
            if regularizer is not None:
                regularizer.after_step(model, skipped=False)
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)


def test_fp16_scaler_unscales_and_flags_infinite_gradients():
    p = nn.Parameter(torch.ones(3))
    scaler = LossScaler(init_scale=8.0)
    scaler.backward((p * 2).sum())
    assert torch.equal(p.grad, torch.full((3,), 16.0))
    check = GradientCheck([p])  # as the loop's closure unscales each pass
    assert check(1.0 / scaler.scale).item() == 0 and torch.equal(p.grad, torch.full((3,), 2.0))
    p.grad[1] = float("inf")
    assert check(1.0 / scaler.scale).item() > 0
    scaler.growth_interval = 2
    scaler.update(skipped=False)
    scaler.update(skipped=False)
    assert scaler.scale == 16.0


def test_a_diverging_run_stops_with_its_metrics_kept(tmp_path, capsys):
    argv = [
        "--arch_type",
        "mlp",
        "--lr",
        "1e12",
        "--momentum",
        "0",
        "--epochs",
        "2",
        "--batch_size",
        "64",
        "--max_consecutive_skips",
        "3",
        "--cpu",
        "--output_dir",
        str(tmp_path),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert "3 consecutive steps with a non-finite loss or gradient" in err
    run = only_run(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["status"] == "diverged" and summary["skipped_steps"] >= 3
    assert read_jsonl(run / "metrics.jsonl")


@pytest.mark.parametrize("name", VARIANTS)
def test_bf16_autocast_trains_every_variant(name, tmp_path):
    config = RunConfig(
        optimizer=name, epochs=1, batch_size=64, max_steps=4, mixed_precision="bf16", cpu=True, output_dir=str(tmp_path)
    )
    summary = train(config).summary
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert summary["final_train_loss"] == summary["final_train_loss"]  # finite, not NaN


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mixed_precision", "fp16", "--cpu"], "mixed_precision fp16 needs a CUDA GPU"),
        (["--output_dir", "/proc/sam-bench/out"], "is not writable"),
        (["--output_dir", "FILE/out"], "is not writable"),
        (["--sam_type", "SAM", "--grad_accum_steps", "0"], "grad_accum_steps must be an integer >= 1"),
        (["--sam_type", "SAM", "--grad_accum_steps", "3", "--batch_size", "64"], "must be divisible"),
        (["--resume", "/nonexistent/run"], "no config.json there"),
    ],
)
def test_more_bad_input(argv, message, capsys, tmp_path):
    (tmp_path / "FILE").write_text("")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    if "--output_dir" not in argv:
        argv = argv + ["--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()
