"""The claims table: differences, standard errors and verdicts derived by hand."""

import json

import pytest
from test_results import make_run

from bench.report.claims import METRICS, claims_table, load_claims, main
from bench.report.runs import ResultsError, load_runs


def runs_of(root, optimizer, accs, sample_passes):
    for seed, acc in enumerate(accs):
        run = make_run(root, optimizer, seed=seed, acc=acc)
        summary = json.loads((run / "summary.json").read_text())
        summary["sample_passes_per_step"] = sample_passes
        (run / "summary.json").write_text(json.dumps(summary))


def test_verdicts_follow_two_standard_errors_and_the_cost(tmp_path):
    runs_of(tmp_path, "sgd", [0.80, 0.81, 0.82], 1.0)
    runs_of(tmp_path, "sam", [0.85, 0.86, 0.87], 2.0)
    runs_of(tmp_path, "asam", [0.85, 0.87, 0.86], 2.0)  # same mean as SAM
    runs_of(tmp_path, "esam", [0.855, 0.86, 0.865], 1.5)  # 0.5 points below, cheaper
    runs_of(tmp_path, "looksam", [0.70, 0.71, 0.72], 1.2)  # cheaper but far worse
    table = claims_table(load_runs([tmp_path])).set_index("claim")
    # d = 86 - 81 = 5 points; se = sqrt(1/3 + 1/3) = 0.816 (std 1 point per optimizer, 3 seeds)
    assert table.loc["SAM beats SGD", "difference (for A) ± se"] == "+5.00 ± 0.82"
    assert table.loc["SAM beats SGD", "verdict"] == "reproduced"
    assert table.loc["ASAM beats SAM", "verdict"] == "inconclusive"
    assert table.loc["ESAM matches SAM at a lower cost", "verdict"] == "reproduced"
    assert table.loc["LookSAM matches SAM at a lower cost", "verdict"] == "contradicted"
    assert "GSAM beats SAM" not in table.index  # no GSAM runs: no row


def test_the_command_writes_one_section_per_setting(tmp_path):
    runs_of(tmp_path / "a", "sgd", [0.80, 0.81, 0.82], 1.0)
    runs_of(tmp_path / "a", "sam", [0.79, 0.80, 0.81], 2.0)
    out = tmp_path / "claims.md"
    assert main([f"small={tmp_path / 'a'}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## small" in text and "| SAM beats SGD |" in text and "| -1.00 ± 0.82 |" in text and "inconclusive" in text


def runs_with(root, optimizer, metric, values):
    for seed, value in enumerate(values):
        run = make_run(root, optimizer, seed=seed, acc=0.8)
        summary = json.loads((run / "summary.json").read_text())
        summary.update({metric: value, "sample_passes_per_step": 1.0})
        (run / "summary.json").write_text(json.dumps(summary))


def test_every_claim_metric_has_its_direction():
    """Higher accuracy is better; lower ECE and lower loss are better: the direction belongs to the metric."""
    assert {m: higher for m, (_, _, higher) in METRICS.items()} == {
        "final_test_acc": True,
        "final_test_ece": False,
        "final_test_loss": False,
    }
    assert all(c.higher_is_better == METRICS[c.metric][2] for c in load_claims())
    assert {c.metric for c in load_claims()} <= set(METRICS)


def test_a_lower_ece_reproduces_better_calibration(tmp_path):
    """bSAM's ECE 2 points below SAM's and 3 below SGD's: lower is better, so both calibration claims reproduce."""
    runs_with(tmp_path, "sgd", "final_test_ece", [0.050, 0.051, 0.049])
    runs_with(tmp_path, "sam", "final_test_ece", [0.040, 0.041, 0.039])
    runs_with(tmp_path, "bsam", "final_test_ece", [0.020, 0.021, 0.019])
    table = claims_table(load_runs([tmp_path])).set_index("claim")
    assert table.loc["bSAM is better calibrated than SAM", "verdict"] == "reproduced"
    assert (
        table.loc["bSAM is better calibrated than SAM", "difference (for A) ± se"] == "+2.00 ± 0.08"
    )  # std 0.1 point: se = 0.1 sqrt(2/3)
    assert table.loc["bSAM is better calibrated than SGD", "verdict"] == "reproduced"


def test_a_bad_claims_file_is_one_line(tmp_path):
    path = tmp_path / "claims.toml"
    path.write_text('[[claim]]\ntext = "x"\na = "sam"\nb = "sgd"\nkind = "beats"\nmetric = "final_test_ece"\n')
    with pytest.raises(ResultsError, match="expected exactly the keys"):
        load_claims(path)
    path.write_text(path.read_text() + 'source = "s"\n')
    assert load_claims(path)[0].higher_is_better is False
    path.write_text(path.read_text().replace('"final_test_ece"', '"final_train_acc"'))
    with pytest.raises(ResultsError, match="metric 'final_train_acc' is not one of"):
        load_claims(path)
