"""Every bad input gets one line and exit code 2 (or a one-line exception), and nothing is written;
resume is idempotent; run files look like any file the user writes."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.cli.main import main
from bench.io import read_json, read_jsonl
from bench.loop.checkpoint import export_model
from bench.loop.step import TrainClosure, take_step
from optimizers import create_optimizer

FAST = ["--arch", "mlp", "--epochs", "1", "--batch_size", "64", "--cpu"]


def only_run(path: Path) -> Path:
    (run,) = [p for p in path.iterdir() if p.is_dir()]
    return run


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--momentum", "nan"], "momentum must be a finite number in [0, 1)"),
        (["--weight_decay=-inf"], "weight_decay must be a finite number >= 0"),
        (["--label_noise", "inf"], "label_noise must be a finite number in [0, 1)"),
        (["--warmup_epochs", "nan"], "warmup_epochs must be a finite number >= 0"),
        (["--sam_type", "SAM", "--rho", "nan"], "rho must be a finite number >= 0, got nan"),
        (["--sam_type", "SAM", "--rho", "inf"], "rho must be a finite number >= 0, got inf"),
        (["--sam_type", "ESAM", "--beta", "nan"], "beta must be a finite number in (0, 1]"),
        (["--sam_type", "GSAM", "--rho", "0.05", "--rho_min", "0.1"], "rho_min must be in"),
        (["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["--seed", "4294967296"], "seed must be an integer in [0, 4294967295]"),
        (["--split_seed", "-5"], "split_seed must be an integer in [0, 4294967295]"),
        (["--val_fraction", "1"], "val_fraction must be in [0, 1), got 1.0"),
        (["--threads", "0"], "threads must be an integer >= 1"),
        # too small for its downsampling: the shapes, before a step raises from inside the model
        (["--arch", "fastnet"], "arch fastnet fails on the 8x8 images of digits: Given input size: (256x1x1)"),
    ],
)
def test_bad_values_are_refused_before_any_work(argv, message, capsys, tmp_path):
    assert main([*FAST, *argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0.05", float("nan"), float("inf"), -0.1, None])
def test_the_python_api_refuses_the_same_values_in_one_line(value):
    with pytest.raises(ValueError, match=r"^rho must be ") as caught:
        create_optimizer("sam", nn.Linear(2, 2), lr=0.1, rho=value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "state, message",
    [("missing", "no such folder"), ("empty", "no runs under"), ("truncated", "no readable run")],
)
def test_table_on_a_bad_folder_is_one_error_line(state, message, capsys, tmp_path):
    folder = tmp_path / "runs"
    if state != "missing":
        folder.mkdir()
    if state == "truncated":
        run = folder / "r"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"dataset": "digits", "arch": "mlp", "optimizer": "sgd"}))
        (run / "summary.json").write_text('{"status": "compl')
    assert main(["table", str(folder), "--out", str(tmp_path / "table")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    if state == "truncated":
        assert "summary.json" in err
    assert not (tmp_path / "table.md").exists()


def test_a_malformed_summary_is_named_and_skipped(capsys, tmp_path):
    runs = tmp_path / "runs"
    assert main([*FAST, "--max_steps", "2", "--output_dir", str(runs)]) == 0
    good = only_run(runs)
    bad = runs / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    (bad / "summary.json").write_text("{")
    capsys.readouterr()
    assert main(["table", str(runs), "--out", str(tmp_path / "table")]) == 0
    err = capsys.readouterr().err
    assert str(bad / "summary.json") in err
    assert "| digits | mlp | sgd |" in (tmp_path / "table.md").read_text()


# -- resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--max_steps", "3"]])
def test_resuming_a_finished_run_changes_nothing_and_says_so(extra, capsys, tmp_path):
    argv = [*FAST, *extra, "--output_dir", str(tmp_path)]
    assert main(argv) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main([*argv, "--resume", "auto"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert main(["--resume", str(only_run(tmp_path))]) == 0
    assert "already finished" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_resume_auto_with_new_settings_says_it_starts_a_new_run(capsys, tmp_path):
    assert main([*FAST, "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main([*FAST, "--max_steps", "2", "--lr", "0.05", "--output_dir", str(tmp_path), "--resume", "auto"]) == 0
    assert "starting a new one" in capsys.readouterr().err
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_flags_that_contradict_the_resumed_run_are_refused(capsys, tmp_path):
    assert main([*FAST, "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    run = only_run(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["--resume", str(run), "--lr", "0.2", "--sam_type", "SAM", "--batch_size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "settings differ from its config.json" in err and "--lr (0.1 there, 0.2 given)" in err
    assert "--sam_type ('sgd' there, 'sam' given)" in err and "batch_size" not in err and "\n" not in err
    assert snapshot(tmp_path) == before


# -- non-finite values ---------------------------------------------------------------------------------


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_step():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    opt = create_optimizer("sam", model, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    closure = TrainClosure(
        model,
        nn.CrossEntropyLoss(reduction="none"),
        torch.randn(8, 4),
        torch.randint(0, 3, (8,)),
        accelerator=Accelerator(cpu=True),
        ascent_sync="local",
        scaler=None,
    )
    assert take_step(opt, closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_diverged_run_exports_no_non_finite_weights_and_records_no_fake_loss(capsys, tmp_path):
    argv = ["--lr", "1e30", "--momentum", "0", "--max_consecutive_skips", "3", *FAST, "--output_dir", str(tmp_path)]
    assert main(argv) == 1
    run = only_run(tmp_path)
    summary = read_json(run / "summary.json")
    assert summary["status"] == "diverged" and summary["skipped_steps"] >= 3
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["train_loss"] is None or r["train_loss"] > 0 for r in rows)
    weights = load_file(run / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_non_finite_weights_are_never_exported(tmp_path):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert "no model exported" in export_model(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    finite = tmp_path / "checkpoints" / "step_00000004"
    finite.mkdir(parents=True)
    save_file(nn.Linear(2, 2).state_dict(), str(finite / "model.safetensors"))
    (finite / "complete.json").write_text("{}")
    assert "exported the weights of step_00000004" in export_model(model, tmp_path)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["weight"], load_file(finite / "model.safetensors")["weight"])


# -- files -------------------------------------------------------------------------------------------------


def test_run_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main([*FAST, "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    run = only_run(tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
