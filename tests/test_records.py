"""Per-run files: every table and claims report regenerates from them, byte for byte, with no run folder."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_results import make_run

from bench.report import records
from bench.report.claims_report import main as claims_main
from bench.report.tables import write_comparison

ROOT = Path(__file__).resolve().parents[1]


def _runs(root: Path) -> None:
    """Three optimizers x three seeds, one with sharpness, one unfinished, one with two settings."""
    for optimizer, accs in (("sgd", (0.8, 0.81, 0.82)), ("sam", (0.83, 0.845, 0.85)), ("esam", (0.825, 0.84, 0.85))):
        for seed, acc in enumerate(accs):
            run = make_run(root, optimizer, seed=seed, acc=acc)
            summary = json.loads((run / "summary.json").read_text())
            summary.update(
                num_classes=10, final_train_loss=0.25 + seed / 100, step_time_s=0.01 * (1 + seed / 10), torch_threads=2
            )
            (run / "summary.json").write_text(json.dumps(summary))
            if optimizer == "sam":
                sharpness = {"hessian_max_eigenvalue": 10.0 + seed, "hessian_eigenvalue_residual": 1e-3, "sam_sharpness": None}
                (run / "sharpness.json").write_text(json.dumps(sharpness))
    # unfinished, at the second setting: its claims are not testable there (a run that did not complete), the first's are
    make_run(root, "sam", seed=5, acc=None, hyperparameters={"rho": 0.1})
    make_run(root, "sam", seed=0, acc=0.1234567891234, hyperparameters={"rho": 0.1})


def test_a_record_reads_back_exactly(tmp_path):
    record = {name: None for name in records.COLUMNS}
    record.update(
        run_id="r",
        status="completed",
        seed=3,
        final_test_acc=0.1 + 0.2,
        contended=True,
        dirty=False,
        settings={"a": [1, 2]},
        versions={},
    )
    path = tmp_path / "x_runs.csv"
    path.write_text(records.to_csv([record]))
    (back,) = records.read(path)
    assert back["final_test_acc"] == 0.1 + 0.2 and back["seed"] == 3 and back["contended"] is True and back["dirty"] is False
    assert back["settings"] == {"a": [1, 2]} and back["commit"] is None


def test_a_file_written_before_a_column_was_added_reads_it_as_not_recorded(tmp_path):
    """A per-run file from before power iteration's residual was recorded reads, that cell blank (NaN); a run's
    sharpness.json gives it to the records written now."""
    import math

    from bench.report.runs import read_records

    _runs(tmp_path / "runs")
    written = records.to_csv(read_records([tmp_path / "runs"])[0])
    rows = [line.split(",") for line in written.splitlines()]
    column = rows[0].index("hessian_eigenvalue_residual")
    recorded = [row[column] for row in rows[1:] if row[column]]
    assert recorded == ["0.001"] * 3  # the three sam runs with a sharpness.json
    earlier = "\n".join(",".join(row[:column] + row[column + 1 :]) for row in rows) + "\n"
    (tmp_path / "old_runs.csv").write_text(earlier)
    (tmp_path / "new_runs.csv").write_text(written)
    old, new = records.read(tmp_path / "old_runs.csv"), records.read(tmp_path / "new_runs.csv")
    assert all(math.isnan(r["hessian_eigenvalue_residual"]) for r in old)
    assert [{k: v for k, v in r.items() if k != "hessian_eigenvalue_residual"} for r in old] == [
        {k: v for k, v in r.items() if k != "hessian_eigenvalue_residual"} for r in new
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,b\n1,2\n", "not a per-run file"),
        (",".join(records.COLUMNS) + "\n", "no runs"),
        (",".join(records.COLUMNS) + "\nx\n", "line 2: 1 cells"),
    ],
)
def test_a_bad_per_run_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "x_runs.csv"
    path.write_text(text)
    with pytest.raises(records.RecordsError, match=message):
        records.read(path)


def test_tables_and_claims_regenerate_from_the_per_run_file_alone(tmp_path):
    _runs(tmp_path / "runs")
    first, second = tmp_path / "first", tmp_path / "second"
    write_comparison([tmp_path / "runs"], first / "t", "# t\n\n")
    per_run = first / "t_runs.csv"
    assert claims_main([f"t={per_run}", "--out", str(first / "claims.md")]) == 0
    shutil.rmtree(tmp_path / "runs")
    write_comparison([per_run], second / "t", "# t\n\n")
    assert claims_main([f"t={per_run}", "--out", str(second / "claims.md")]) == 0
    for name in ("t.csv", "t.md", "t.tex", "t_runs.csv", "claims_forest.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    claims = [(d / "claims.md").read_text().replace(f" --out {d / 'claims.md'}", "") for d in (first, second)]
    assert claims[0] == claims[1]
    text = (first / "t.md").read_text()
    assert "sam" in text and "rho=0.1" in text


def test_every_committed_table_regenerates_from_its_per_run_file(tmp_path, monkeypatch):
    """The command each committed table names, with --from_records, rewrites it byte for byte; and the
    committed claims report's own command reproduces it."""
    results = ROOT / "results"
    per_run = sorted(results.glob("*_runs.csv"))
    assert per_run, "no per-run file is committed"
    for path in per_run:
        name = path.name[: -len(records.SUFFIX)]
        if re.search(r"_tuning(_seed\d+)?$", name):  # a tuning's trials: checked with its tuned table (the same command)
            continue
        command = re.search(r"Generated by `python launch.py ?(sweep |tune )?([^`]*)`", (results / f"{name}.md").read_text())
        subcommand, args = (command.group(1) or "sweep").strip(), (command.group(2) or "digits").split()
        out = tmp_path / name
        out.mkdir()
        written = [f"{name}{suffix}" for suffix in (".csv", ".md", ".tex", records.SUFFIX)]
        inputs = []
        if (
            subcommand == "tune"
        ):  # its trials' file too, and tuning seed 0's, whose choices and verdicts a later seed's stand beside
            recipe, seed = re.fullmatch(r"(.*)_tuned(_seed\d+)?", name).groups()
            written += [f"{recipe}_tuning{seed or ''}.md", f"{recipe}_tuning{seed or ''}{records.SUFFIX}"]
            inputs = [f"{recipe}_tuning{records.SUFFIX}", f"{recipe}_tuned{records.SUFFIX}"]
        for given in {*inputs, *(w for w in written if w.endswith(records.SUFFIX))}:
            shutil.copy(results / given, out / given)
        done = subprocess.run(
            [sys.executable, "launch.py", subcommand, *args, "--from_records", "--results_dir", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        for file in written:
            assert (out / file).read_bytes() == (results / file).read_bytes(), file
    # the committed files, whatever the quickstart (which rewrites the default suite's tables) left in the tree
    committed = tmp_path / "committed"
    (committed / "results").mkdir(parents=True)
    for path in [*per_run, results / "claims.md"]:
        (committed / "results" / path.name).write_bytes(_committed(path))
    claims = (committed / "results" / "claims.md").read_text()
    command = re.search(r"Generated by `python launch.py claims ([^`]*)`", claims).group(1).split()
    out = tmp_path / "claims.md"
    monkeypatch.chdir(committed)
    assert claims_main([*command, "--out", str(out)]) == 0
    assert out.read_text().replace(f" --out {out}", "") == claims


def _committed(path: Path) -> bytes:
    """The file as committed (HEAD), or as it is where the tree is not a git checkout."""
    done = subprocess.run(["git", "show", f"HEAD:{path.relative_to(ROOT).as_posix()}"], cwd=ROOT, capture_output=True)
    return done.stdout if done.returncode == 0 else path.read_bytes()
