"""The harness end to end: launch.py, the seed project's command lines, run files, tables, bad input."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli.flags import run_parser
from bench.cli.main import main
from bench.cli.run import config_from_args
from bench.io import read_json, read_jsonl
from optimizers import available_optimizers

ROOT = Path(__file__).resolve().parents[1]

#: The seed project's README commands, verbatim.
SEED_COMMANDS = {
    "sam": "--dataset cifar10 --arch_type wideresnet28 --optimizer sgd --epochs 200 --batch_size 128 --lr 0.05 "
    "--weight_decay 5e-4 --warmup_epochs 5 --sam_type SAM --rho 0.05 --seed 1234",
    "sam_pyramidnet": "--dataset cifar100 --arch_type pyramidnet --optimizer sgd --epochs 200 --batch_size 128 --lr 0.05 "
    "--weight_decay 5e-4 --warmup_epochs 5 --sam_type SAM --rho 0.05 --seed 1234",
    "asam": "--dataset cifar10 --arch_type wideresnet28 --optimizer sgd --epochs 200 --batch_size 128 --lr 0.05 "
    "--weight_decay 5e-4 --warmup_epochs 5 --sam_type SAM --adaptive --rho 0.05 --seed 1234",
    "esam": "--dataset cifar10 --arch_type wideresnet28 --optimizer sgd --epochs 200 --batch_size 128 --lr 0.05 "
    "--weight_decay 5e-4 --warmup_epochs 5 --sam_type ESAM --rho 0.05 --beta 0.5 --gamma 0.5 --seed 1234",
    "fisher": "--dataset cifar10 --arch_type wideresnet28 --optimizer sgd --epochs 200 --batch_size 128 --lr 0.05 "
    "--weight_decay 5e-4 --warmup_epochs 5 --sam_type FisherSAM --rho 0.05 --eta 0.2 --seed 1234",
    "bsam": "--dataset cifar10 --arch_type resnet18 --optimizer sgd --epochs 180 --batch_size 200 --lr 0.5 "
    "--weight_decay 0 --sam_type BayesianSAM --msharpness 8 --gamma 0.1 --rho 0.01 --delta 10 --seed 1234",
    "bsam_c100": "--dataset cifar100 --arch_type resnet34 --optimizer sgd --epochs 180 --batch_size 200 --lr 0.5 "
    "--weight_decay 0 --sam_type BayesianSAM --msharpness 8 --gamma 0.1 --rho 0.01 --delta 10 --seed 1234",
    "friendly": "--dataset cifar10 --arch_type wideresnet28 --optimizer sgd --epochs 200 --batch_size 128 --lr 0.05 "
    "--weight_decay 5e-4 --sam_type FriendlySAM --rho 0.05 --sigma 1.0 --lmbda 0.9 --seed 1234",
    "looksam": "--dataset cifar10 --arch_type wideresnet28 --optimizer sgd --epochs 200 --batch_size 128 --lr 0.05 "
    "--weight_decay 5e-4 --sam_type LookSAM --rho 0.05 --k 5 --alpha 1.0 --seed 1234",
}

EXPECTED = {
    "sam": ("sam", {"rho": 0.05}),
    "sam_pyramidnet": ("sam", {"rho": 0.05}),
    "asam": ("adaptive_sam", {"rho": 0.05}),
    "esam": ("esam", {"rho": 0.05, "beta": 0.5, "gamma": 0.5}),
    "fisher": ("fisher_sam", {"rho": 0.05, "eta": 0.2}),
    "bsam": ("bsam", {"rho": 0.01, "msharpness": 8, "damping": 0.1, "prior_precision": 10.0}),
    "bsam_c100": ("bsam", {"rho": 0.01, "msharpness": 8, "damping": 0.1, "prior_precision": 10.0}),
    "friendly": ("friendly_sam", {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9}),
    "looksam": ("looksam", {"rho": 0.05, "k": 5, "alpha": 1.0}),
}


@pytest.mark.parametrize("key", sorted(SEED_COMMANDS))
def test_seed_commands_map_onto_variants(key):
    config, notes = config_from_args(run_parser().parse_args(shlex.split(SEED_COMMANDS[key])))
    name, hyperparameters = EXPECTED[key]
    assert config.optimizer == name and config.hyperparameters == hyperparameters
    assert config.epochs in (180, 200) and config.seed == 1234
    if key == "asam":
        assert any("adaptive_sam" in n for n in notes)


def test_a_flag_the_variant_does_not_use_is_reported(capsys, tmp_path):
    _, notes = config_from_args(run_parser().parse_args(["--sam_type", "SAM", "--eta", "0.2", "--k", "3"]))
    assert "--eta is not used by sam; ignored" in notes and "--k is not used by sam; ignored" in notes
    _, notes = config_from_args(run_parser().parse_args(["--optimizer", "adamw", "--momentum", "0.5", "--nesterov"]))
    assert "--momentum, --nesterov set SGD's update, not adamw's: ignored" in notes
    _, notes = config_from_args(run_parser().parse_args(["--sam_type", "SAM", "--optimizer", "adamw", "--momentum", "0.5"]))
    assert "--momentum sets SGD's update, not adamw's: ignored" in notes


@pytest.mark.parametrize("spelling", ["--ascent_sync", "--sam_sync"])
def test_the_ascent_sync_takes_its_name_and_the_old_spelling(spelling):
    config, _ = config_from_args(run_parser().parse_args(["--sam_type", "SAM", spelling, "global"]))
    assert config.ascent_sync == "global"


def test_seed_sam_command_runs_on_a_cifar_fixture(cifar10_dir, tmp_path):
    """The seed's SAM command with --max_steps 2 --data_dir appended; a small model keeps CI fast
    (the verbatim WRN-28-10 run is the same code path at 36.5M parameters)."""
    argv = shlex.split(SEED_COMMANDS["sam"]) + [
        "--max_steps",
        "2",
        "--data_dir",
        str(cifar10_dir),
        "--output_dir",
        str(tmp_path),
        "--arch_type",
        "resnet8",
    ]
    assert main(argv) == 0
    (run,) = list(tmp_path.iterdir())
    summary = read_json(run / "summary.json")
    assert summary["steps"] == 2 and summary["stopped_early"] and summary["passes_per_step"] == 2
    config = read_json(run / "config.json")
    assert config["lr"] == 0.05 and config["warmup_epochs"] == 5 and config["hyperparameters"] == {"rho": 0.05}
    assert "torch" in config["environment"] and config["environment"]["processor"]


def test_launch_py_writes_run_files_and_a_table(tmp_path):
    """launch.py, and main.py (the seed project's entry, for its command lines verbatim), run; table reads them."""
    runs = tmp_path / "runs"
    for entry, sam_type in (("launch.py", "none"), ("main.py", "SAM")):
        cmd = [
            sys.executable,
            entry,
            "--sam_type",
            sam_type,
            "--epochs",
            "2",
            "--batch_size",
            "64",
            "--output_dir",
            str(runs),
            "--cpu",
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    run_dirs = sorted(runs.iterdir())
    assert len(run_dirs) == 2
    for run in run_dirs:
        rows = read_jsonl(run / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1, 2]
        assert {"train_loss", "test_acc", "lr", "rho", "epoch_time_s", "images_per_s", "passes_per_step"} <= set(rows[0])
        summary = read_json(run / "summary.json")
        assert summary["final_test_acc"] > 0.5 and summary["num_params"] > 0
    done = subprocess.run(
        [sys.executable, "launch.py", "table", str(runs), "--out", str(tmp_path / "table")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    csv = (tmp_path / "table.csv").read_text()
    assert "sgd" in csv and "sam" in csv
    assert "| digits | smallcnn | sam | 1 |" in (tmp_path / "table.md").read_text()


def test_max_steps_stops_the_run_and_says_so(tmp_path):
    assert main(["--sam_type", "ESAM", "--epochs", "3", "--max_steps", "5", "--output_dir", str(tmp_path), "--cpu"]) == 0
    (run,) = list(tmp_path.iterdir())
    summary = read_json(run / "summary.json")
    assert summary["steps"] == 5 and summary["stopped_early"] and summary["epochs_completed"] == 1


def test_test_every_epochs_skips_test_evaluations_and_changes_nothing_else(tmp_path):
    common = ["--epochs", "3", "--batch_size", "64", "--val_fraction", "0.2", "--cpu"]
    main(common + ["--output_dir", str(tmp_path / "every")])
    main(common + ["--output_dir", str(tmp_path / "sparse"), "--test_every_epochs", "2"])
    (every,), (sparse,) = (list((tmp_path / d).iterdir()) for d in ("every", "sparse"))
    assert every.name == sparse.name  # an operational setting: the same run
    rows, sparse_rows = read_jsonl(every / "metrics.jsonl"), read_jsonl(sparse / "metrics.jsonl")
    assert [("test_acc" in r) for r in sparse_rows] == [False, True, True]  # epoch 2: due; 3: the last
    for row, sparse_row in zip(rows, sparse_rows):
        assert sparse_row["val_acc"] == row["val_acc"] and sparse_row["train_loss"] == row["train_loss"]
        assert sparse_row.get("test_acc", row["test_acc"]) == row["test_acc"]
    summary, sparse_summary = read_json(every / "summary.json"), read_json(sparse / "summary.json")
    assert sparse_summary["final_test_acc"] == summary["final_test_acc"]
    main(["--max_steps", "5", "--test_every_epochs", "2", "--output_dir", str(tmp_path / "stopped"), "--cpu"])
    (stopped,) = list((tmp_path / "stopped").iterdir())
    assert "test_acc" in read_jsonl(stopped / "metrics.jsonl")[-1]  # a run that stops early ends with a test row


@pytest.mark.parametrize("name", [n for n in available_optimizers() if n not in ("adam", "adamw")])
def test_every_optimizer_lowers_the_training_loss_on_digits(name, tmp_path):
    argv = ["--sam_type", name, "--epochs", "4", "--batch_size", "64", "--lr", "0.05", "--output_dir", str(tmp_path), "--cpu"]
    if name == "bsam":
        argv += ["--lr", "0.5", "--warmup_epochs", "1"]
    assert main(argv) == 0
    (run,) = list(tmp_path.iterdir())
    losses = [r["train_loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sam_type", "nope"], "unknown --sam_type 'nope'; choose one of: sam"),
        (["--sam_type", "SAM", "--rho", "-1"], "rho must be >= 0"),
        (["--sam_type", "LookSAM", "--k", "0"], "k must be an integer >= 1"),
        (["--sam_type", "ESAM", "--gamma", "0"], "gamma must be in (0, 1]"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'; choose one of: cifar10"),
        (["--arch_type", "resnet19"], "unknown architecture 'resnet19'; choose one of:"),
        (["--optimizer", "lion"], "unknown --optimizer 'lion' (the base optimizer); choose one of: sgd"),
        (["--mixed_precision", "fp8"], "unknown mixed_precision 'fp8'; choose one of: no, bf16, fp16"),
        (["--epochs", "x"], "invalid int value"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import bench.data.cifar

    monkeypatch.setattr(bench.data.cifar, "_torchvision_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert main(["--dataset", "cifar10", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "CIFAR-10 not found" in err and str(tmp_path) in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_the_linear_schedule_warms_up_then_decays_to_zero():
    from bench.config import RunConfig
    from bench.loop.state import lr_lambda

    factor = lr_lambda(RunConfig(epochs=4, warmup_epochs=1, schedule="linear"), steps_per_epoch=10)
    assert [factor(s) for s in (0, 9)] == [0.1, 1.0]  # warm-up: (step + 1) / 10
    assert [factor(s) for s in (10, 25, 40)] == [1.0, 0.5, 0.0]  # then linearly to 0 at the last step's end


def test_test_flips_evaluate_on_the_mean_logits_of_each_image_and_its_mirror():
    import torch
    from accelerate import Accelerator
    from torch import nn

    from bench.data.augment import normalize
    from bench.data.datasets import ImageDataset
    from bench.loop.evaluation import evaluate

    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    data = ImageDataset(images, labels, num_classes=3, mean=(0.5,), std=(0.25,), name="t")
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))  # not mirror-symmetric
    plain = evaluate(model, data, images, labels, Accelerator(cpu=True))
    flipped = evaluate(model, data, images, labels, Accelerator(cpu=True), flips=True)
    x = normalize(images, data.mean, data.std)
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert flipped["test_loss"] == pytest.approx(expected, rel=1e-6) and plain["test_loss"] != pytest.approx(expected)
    assert flipped["test_acc"] == (logits.argmax(-1) == labels).float().mean().item()


def test_the_best_epoch_is_chosen_among_those_whose_test_accuracy_was_measured():
    """With a validation split and the test set read every other epoch, the epoch of best validation accuracy
    among those with a test accuracy: best_test_acc is a number, never blank for an untested epoch."""
    from bench.loop.finish import _selected_row

    rows = [
        {"epoch": 1, "val_acc": 0.80, "test_acc": None},
        {"epoch": 2, "val_acc": 0.85, "test_acc": 0.70},
        {"epoch": 3, "val_acc": 0.90, "test_acc": None},
        {"epoch": 4, "val_acc": 0.88, "test_acc": 0.72},
    ]
    assert _selected_row(rows)["epoch"] == 4
    trials = [{"epoch": 1, "val_acc": 0.8, "test_acc": None}, {"epoch": 2, "val_acc": 0.7, "test_acc": None}]
    assert _selected_row(trials)["epoch"] == 1  # a tuning trial: the test set is never read
