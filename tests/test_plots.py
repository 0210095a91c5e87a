"""Figures from fake run directories: files exist, are PNG, pairs are not mixed, curves add up."""

import json
from pathlib import Path

import pytest

from bench.report.plots import load_curves, plot_accuracy_vs_epoch, plot_accuracy_vs_sharpness, write_plots
from bench.report.runs import RunSkipped, optimizer_order

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 4
EPOCH_TIME = {"sgd": 1.5, "sam": 3.0}


def make_run(
    root: Path, dataset: str, arch: str, optimizer: str, seed: int, sharpness: bool = False, epochs: int = EPOCHS
) -> Path:
    run = root / f"{dataset}_{arch}_{optimizer}_s{seed}"
    run.mkdir(parents=True)
    config = {
        "dataset": dataset,
        "arch": arch,
        "optimizer": optimizer,
        "seed": seed,
        "label_noise": 0.0,
        "epochs": epochs,
        "lr": 0.1,
    }
    (run / "config.json").write_text(json.dumps(config, indent=2))
    passes = 1.0 if optimizer == "sgd" else 2.0
    rows = []
    for epoch in range(1, epochs + 1):
        acc = 0.3 + 0.1 * epoch + 0.02 * seed + (0.03 if optimizer == "sam" else 0.0)
        rows.append(
            {
                "epoch": epoch,
                "step": 10 * epoch,
                "train_loss": 2.0 / epoch,
                "train_acc": acc - 0.05,
                "test_loss": 2.1 / epoch,
                "test_acc": acc,
                "test_ece": 0.05,
                "lr": 0.1,
                "rho": 0.05,
                "epoch_time_s": EPOCH_TIME[optimizer] + 0.5 * seed,
                "images_per_s": 1000.0,
                "passes_per_step": passes,
                "sample_passes_per_step": passes,
                "skipped_steps": 0,
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "run_id": run.name,
        "status": "completed",
        "dataset": dataset,
        "arch": arch,
        "optimizer": optimizer,
        "seed": seed,
        "final_test_acc": rows[-1]["test_acc"],
        "best_test_acc": rows[-1]["test_acc"],
        "final_test_loss": rows[-1]["test_loss"],
        "final_test_ece": 0.05,
        "train_time_s": sum(r["epoch_time_s"] for r in rows),
        "wall_time_s": 99.0,
        "passes_per_step": passes,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    if sharpness:
        value = (40.0 if optimizer == "sgd" else 15.0) + seed
        (run / "sharpness.json").write_text(
            json.dumps({"hessian_max_eigenvalue": value, "hessian_trace": 10 * value, "sam_sharpness": value / 100, "loss": 0.4})
        )
    return run


def make_grid(root: Path, sharpness: bool = False, dataset: str = "cifar10", arch: str = "resnet8") -> list[Path]:
    # "sam" appears first on purpose: legends must still put "sgd" first
    return [make_run(root, dataset, arch, opt, seed, sharpness) for opt in ("sam", "sgd") for seed in (0, 1)]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_load_curves_rows_and_cumulative_time(tmp_path):
    runs = make_grid(tmp_path / "runs")
    curves = load_curves(runs)
    assert len(curves) == 2 * 2 * EPOCHS
    assert {"run_dir", "dataset", "arch", "optimizer", "seed", "epoch", "test_acc", "elapsed_s"} <= set(curves.columns)
    assert set(curves.groupby("run_dir").size()) == {EPOCHS}
    one = curves[(curves["optimizer"] == "sam") & (curves["seed"] == 1)].sort_values("epoch")
    assert one["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert one["elapsed_s"].tolist() == pytest.approx([3.5 * e for e in range(1, EPOCHS + 1)])
    assert set(curves["dataset"]) == {"cifar10"} and set(curves["arch"]) == {"resnet8"}
    assert load_curves([tmp_path / "missing"]).empty


def test_optimizer_order_puts_sgd_first():
    # one order for tables and legends (bench.report.tables); tests/test_results.py checks the legends follow it
    assert optimizer_order(["sam", "asam", "sam", "sgd", "gsam"]) == ["sgd", "sam", "asam", "gsam"]
    assert optimizer_order(["sam", "asam"]) == ["sam", "asam"]


def test_malformed_run_files_are_named_and_left_out(tmp_path):
    runs = make_grid(tmp_path / "runs", sharpness=True)
    (runs[0] / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 0.5}\n{"epoch": 2, "te')
    (runs[1] / "sharpness.json").write_text('{"hessian_max_eigenvalue": ')
    (runs[2] / "summary.json").write_text("[]")
    with pytest.warns(RunSkipped) as caught:
        written = write_plots(runs, tmp_path / "figs" / "x")
    named = " ".join(str(w.message) for w in caught)
    for bad in (runs[0] / "metrics.jsonl", runs[1] / "sharpness.json", runs[2] / "summary.json"):
        assert str(bad) in named
    assert [p.name for p in written] == ["x_acc_epoch.png", "x_acc_time.png", "x_acc_final.png", "x_acc_sharpness.png"]
    with pytest.warns(RunSkipped):
        assert set(load_curves(runs)["run_dir"]) == {str(r) for r in runs[1:]}


def test_write_plots_without_sharpness(tmp_path):
    runs = make_grid(tmp_path / "runs")
    out = tmp_path / "figs"
    written = write_plots(runs, out / "cifar")
    assert written == [out / "cifar_acc_epoch.png", out / "cifar_acc_time.png", out / "cifar_acc_final.png"]
    for path in written:
        assert_png(path)
    assert not (out / "cifar_acc_sharpness.png").exists()
    assert plot_accuracy_vs_sharpness(runs, out / "s.png") is None and not (out / "s.png").exists()
    assert no_temporaries(out)


def test_write_plots_with_sharpness(tmp_path):
    runs = make_grid(tmp_path / "runs", sharpness=True)
    written = write_plots(runs, tmp_path / "cifar")
    assert [p.name for p in written] == [
        "cifar_acc_epoch.png",
        "cifar_acc_time.png",
        "cifar_acc_final.png",
        "cifar_acc_sharpness.png",
    ]
    for path in written:
        assert_png(path)
    other = plot_accuracy_vs_sharpness(runs, tmp_path / "trace.png", measure="hessian_trace")
    assert other == tmp_path / "trace.png"
    assert_png(other)
    assert no_temporaries(tmp_path)


def test_two_pairs_are_not_mixed(tmp_path):
    runs = make_grid(tmp_path / "a", sharpness=True) + make_grid(tmp_path / "b", dataset="digits", arch="mlp")
    out = tmp_path / "figs" / "all"
    written = write_plots(runs, out)
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            "all_acc_epoch_cifar10_resnet8.png",
            "all_acc_time_cifar10_resnet8.png",
            "all_acc_final_cifar10_resnet8.png",
            "all_acc_sharpness_cifar10_resnet8.png",  # only the cifar10 runs have sharpness.json
            "all_acc_epoch_digits_mlp.png",
            "all_acc_time_digits_mlp.png",
            "all_acc_final_digits_mlp.png",
        ]
    )
    for path in written:
        assert_png(path)
    assert not (tmp_path / "figs" / "all_acc_epoch.png").exists()
    with pytest.raises(ValueError, match="one \\(dataset, arch\\) pair"):
        plot_accuracy_vs_epoch(load_curves(runs), tmp_path / "mixed.png")
    assert not (tmp_path / "mixed.png").exists()


def test_uneven_run_lengths_and_single_seed(tmp_path):
    runs = [
        make_run(tmp_path, "cifar10", "resnet8", "sgd", 0),
        make_run(tmp_path, "cifar10", "resnet8", "sgd", 1, epochs=2),  # stopped early
        make_run(tmp_path, "cifar10", "resnet8", "sam", 0),
    ]  # one seed: no band
    written = write_plots(runs, tmp_path / "uneven")
    assert len(written) == 3
    for path in written:
        assert_png(path)
