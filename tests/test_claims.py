"""The claims table: differences, standard errors and verdicts derived by hand."""

import json

from test_results import make_run

from bench.claims import claims_table, main
from bench.results import load_runs


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
