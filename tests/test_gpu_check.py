"""The prepared GPU check runs end to end on the CPU in its dry-run mode: every section, every
optimizer, the GPU-minutes study (on a tiny CIFAR-10 in its real format, a subset, one epoch) and the
targets table (shown, not judged)."""

import subprocess
import sys
from pathlib import Path

from test_data import write_cifar10_pickles

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    out, results = tmp_path / "gpu.md", tmp_path / "results"
    write_cifar10_pickles(tmp_path / "cifar10", n_per_batch=20, n_test=20)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--dry_run",
            "--out",
            str(out),
            "--budget_s",
            "100000",
            "--study_data",
            str(tmp_path / "cifar10"),
            "--study_s",
            "100000",
            "--results_dir",
            str(results),
        ],  # no section cut short
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = out.read_text()
    for section in (
        "## Every optimizer in bf16",
        "## Step time: smallcnn",
        "## Host synchronisations per step",
        "## Profile of one harness SAM step",
        "## The GPU-minutes study",
        "## Targets",
    ):
        assert section in report, section
    assert "FAILED" not in report and "not run" not in report
    from optimizers import available_optimizers

    rows = [line for line in report.splitlines() if line.startswith("| ") and "| bf16 | True |" in line]
    assert len(rows) == len(available_optimizers())  # every optimizer trained with finite losses
    targets = report.split("## Targets")[1]
    assert targets.count("not judged (dry run)") == 5  # the ratios, the synchronisations and the study, measured
    # the study: 2 optimizers x 2 seeds, SGD again at twice the epochs, its tables and claims written
    study = report.split("## The GPU-minutes study")[1].split("##")[0]
    assert "6 runs in" in study and "over 2 seeds" in study
    for name in ("cifar10_gpu_minutes.md", "cifar10_gpu_minutes_runs.csv", "claims_gpu_minutes.md"):
        assert (results / name).is_file(), name
    assert "harness SGD step <= 1.05x" in targets and "the GPU-minutes study" in targets
    # the host reads per step are counted: on a CPU, where a read waits for nothing, each pass's skip decision
    syncs = report.split("## Host synchronisations per step")[1].split("##")[0]
    assert "| harness (sgd) | 1 |" in syncs and "| harness (sam) | 2 |" in syncs
