"""Tables from hand-built run directories: every folder state gives a correct table or one error line."""

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.config import RunConfig
from bench.report import plots
from bench.report.runs import ResultsError, RunSkipped, find_run_dirs, load_runs, optimizer_order, read_runs
from bench.report.tables import MIN_TIMED_S, comparison_table, to_markdown, write_comparison

ROOT = Path(__file__).resolve().parents[1]


def make_run(
    root: Path,
    optimizer: str = "sgd",
    seed: int = 0,
    acc: float | None = 0.9,
    status: str = "completed",
    train_time: float = 10.0,
    name: str | None = None,
    **settings,
) -> Path:
    """A run directory as bench.loop leaves it: config.json always, summary.json unless ``acc`` is None."""
    config = RunConfig(dataset="digits", arch="smallcnn", optimizer=optimizer, seed=seed, **settings)
    run = root / (name or f"{config.run_id()}_{status}")
    run.mkdir(parents=True)
    extra = {"run_id": config.run_id(), "world_size": 1, "device": "cpu", "versions": {"torch": "2"}}
    (run / "config.json").write_text(json.dumps({**config.to_dict(), **extra}))
    if acc is not None:
        summary = {
            "run_id": config.run_id(),
            "status": status,
            "dataset": "digits",
            "arch": "smallcnn",
            "optimizer": optimizer,
            "seed": seed,
            "final_test_acc": acc,
            "best_test_acc": acc,
            "final_test_loss": 0.5,
            "final_test_ece": 0.03,
            "train_time_s": train_time,
            "passes_per_step": 1.0,
            "images_per_s": 1000.0,
            "stopped_early": status == "stopped_early",
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def table_of(*paths) -> pd.DataFrame:
    return comparison_table(load_runs(paths))


# ----------------------------------------------------------------------------- folder states


def test_missing_folder_empty_folder_and_a_file_are_one_line_errors(tmp_path):
    with pytest.raises(ResultsError, match=f"^no such folder: {tmp_path / 'nope'}$"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ResultsError, match=r"^no runs under .*empty \(a run directory holds config.json\)$"):
        load_runs([tmp_path / "empty"])
    run = make_run(tmp_path / "runs")
    with pytest.raises(ResultsError, match="^not a run directory: .*summary.json"):
        load_runs([run / "summary.json"])
    with pytest.raises(ResultsError, match="no run directories given"):
        load_runs([])
    assert isinstance(ResultsError("x"), ValueError)


def test_a_run_directory_is_one_with_config_json_and_its_subfolders_are_not_runs(tmp_path):
    run = make_run(tmp_path / "runs")
    (run / "checkpoints" / "step_5").mkdir(parents=True)
    (run / "checkpoints" / "step_5" / "config.json").write_text("{}")
    assert find_run_dirs([tmp_path / "runs", run]) == [run]  # listed twice, counted once


MALFORMED = {
    "truncated": '{"status": "completed", "final_test_acc": 0.9',
    "not an object": "[1, 2]",
    "wrong type": json.dumps({"status": "completed", "final_test_acc": "0.9", "best_test_acc": 0.9, "train_time_s": 1}),
    "missing keys": json.dumps({"status": "completed", "final_test_acc": 0.9}),
    "unknown status": json.dumps({"status": "done", "final_test_acc": 0.9, "best_test_acc": 0.9, "train_time_s": 1}),
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_summary_is_named_and_skipped_and_the_others_are_tabled(tmp_path, content):
    make_run(tmp_path, "sgd", 0, acc=0.80)
    make_run(tmp_path, "sgd", 1, acc=0.90)
    bad = make_run(tmp_path, "sgd", 2, acc=0.10)
    (bad / "summary.json").write_text(content)
    runs, notes = read_runs([tmp_path])
    assert len(notes) == 1 and str(bad / "summary.json") in notes[0] and "skipped" in notes[0]
    with pytest.warns(RunSkipped, match=str(bad / "summary.json")):
        table = write_comparison([tmp_path], tmp_path / "out" / "table")
    assert len(table) == 1 and (table.loc[0, "n"], table.loc[0, "final acc (%)"]) == (2, "85.00 ± 7.07")
    assert table.attrs["notes"] == notes
    assert (tmp_path / "out" / "table.md").is_file()


def test_a_malformed_config_is_named_and_when_every_run_is_skipped_the_error_names_the_files(tmp_path):
    good, bad = make_run(tmp_path, "sgd", 0), make_run(tmp_path, "sgd", 1)
    (bad / "config.json").write_text('{"dataset": "digits", "arch": ')
    runs, notes = read_runs([tmp_path])
    assert list(runs.run_dir) == [str(good)] and str(bad / "config.json") in notes[0]
    (good / "config.json").write_text(json.dumps({"dataset": "digits", "arch": 3, "optimizer": "sgd"}))
    with pytest.raises(ResultsError, match="no readable run: .*") as err:
        read_runs([tmp_path])
    assert str(good / "config.json") in str(err.value) and str(bad / "config.json") in str(err.value)
    assert "\n" not in str(err.value)


def test_a_malformed_sharpness_file_is_named_and_only_the_sharpness_is_left_out(tmp_path):
    run = make_run(tmp_path)
    (run / "sharpness.json").write_text('{"hessian_max_eigenvalue": ')
    with pytest.warns(RunSkipped, match="sharpness.json"):
        table = table_of(tmp_path)
    assert table.loc[0, "n"] == 1 and table.loc[0, "λ_max"] == ""


# ----------------------------------------------------------------------------- grouping and status


def test_runs_differing_in_max_steps_are_never_averaged(tmp_path):
    # averaged together these two gave "45.69 ± 50.48" with n=2
    make_run(tmp_path, "sgd", 0, acc=0.09996, max_steps=11, status="stopped_early")
    make_run(tmp_path, "sgd", 0, acc=0.81384, max_steps=44, status="stopped_early")
    make_run(tmp_path, "sam", 0, acc=0.83, max_steps=44, status="stopped_early")
    table = table_of(tmp_path)
    markdown = to_markdown(table)
    assert "45.69" not in markdown and "50.48" not in markdown
    assert list(table.n) == [1, 1, 1]
    assert list(table.settings) == ["max_steps=11", "max_steps=44", "max_steps=44"]
    assert list(table["final acc (%)"]) == ["10.00 ± 0.00", "81.38 ± 0.00", "83.00 ± 0.00"]
    assert "| settings |" in markdown


def test_seeds_machines_and_operational_fields_do_not_split_a_configuration(tmp_path):
    make_run(tmp_path, "sgd", 0, acc=0.80, output_dir="a", sharpness=True, cpu=True)
    run = make_run(tmp_path, "sgd", 1, acc=0.90, output_dir="b", keep_checkpoints=5)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(
        json.dumps({**config, "device": "cuda:0", "world_size": 4, "versions": {"torch": "3"}, "environment": {"host": "x"}})
    )
    table = table_of(tmp_path)
    assert (len(table), table.loc[0, "n"], table.loc[0, "final acc (%)"]) == (1, 2, "85.00 ± 7.07")


def test_settings_column_names_differing_hyperparameters_only_where_they_differ(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, "sgd", seed)
        make_run(tmp_path, "sam", seed, hyperparameters={"rho": 0.1})
        make_run(tmp_path, "sam", seed)
    make_run(tmp_path, "sgd", 0, epochs=3)
    table = table_of(tmp_path)
    assert list(zip(table.optimizer, table.settings, table.n)) == [
        ("sgd", "epochs=3", 1),
        ("sgd", "epochs=10", 2),
        ("sam", "epochs=10, rho=0.1", 2),
        ("sam", "epochs=10, rho=default", 2),
    ]


def test_the_common_case_keeps_the_committed_columns(tmp_path):
    for optimizer in ("sam", "sgd", "bsam"):
        for seed in (0, 1, 2):
            # runs as short as the default suite's: the committed table flags their ratios imprecise
            run = make_run(
                tmp_path, optimizer, seed, lr=0.5 if optimizer == "bsam" else 0.1, train_time=20.0 if optimizer == "sam" else 10.0
            )
            (run / "sharpness.json").write_text(
                json.dumps({"hessian_max_eigenvalue": 1.0, "sam_sharpness": 0.1, "hessian_trace": 5.0, "loss": 0.1})
            )
    table = table_of(tmp_path)
    committed = (ROOT / "results" / "digits.csv").read_text().splitlines()[0].split(",")
    assert list(table.columns) == committed  # no settings and no status column when nothing needs them
    assert list(table.optimizer) == ["sgd", "sam", "bsam"]
    assert list(table["time vs sgd"]) == [1.0, 2.0, 1.0]  # bSAM, with its own lr, still compared with sgd


def test_stopped_early_and_diverged_runs_are_rows_of_their_own(tmp_path):
    make_run(tmp_path, "sgd", 0, acc=0.80)
    make_run(tmp_path, "sgd", 1, acc=0.90)
    make_run(tmp_path, "sgd", 2, acc=0.10, status="diverged")
    make_run(tmp_path, "sgd", 3, acc=0.50, status="stopped_early")
    table = table_of(tmp_path)
    assert list(zip(table.status, table.n, table["final acc (%)"])) == [
        ("completed", 2, "85.00 ± 7.07"),
        ("stopped_early", 1, "50.00 ± 0.00"),
        ("diverged", 1, "10.00 ± 0.00"),
    ]
    assert list(table["stopped early"]) == [False, True, False]
    assert "settings" not in table  # same settings: the status column tells the rows apart
    assert list(table["time vs sgd"]) == [1.0, "", ""]


def test_runs_timed_on_a_busy_machine_are_counted_in_a_contended_column(tmp_path):
    make_run(tmp_path, "sgd", 0)
    busy = make_run(tmp_path, "sgd", 1, train_time=30.0)
    summary = json.loads((busy / "summary.json").read_text())
    (busy / "summary.json").write_text(json.dumps({**summary, "contended": True}))
    make_run(tmp_path, "sam", 0, train_time=3.0)
    table = table_of(tmp_path)
    assert list(table.contended) == ["1/2", ""]
    assert table.set_index("optimizer").loc["sam", "time vs sgd"] == 0.3  # against the quiet sgd run alone


def timed(run: Path, **loads) -> Path:
    """Record a run's thread count and loads in its summary (as bench.loop does) and the machine's cores."""
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "world_size": 1, "contended": False, **loads}))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "environment": {"cpu_count": 2}}))
    return run


def test_a_run_beside_another_is_contended_by_its_recorded_loads_though_its_summary_says_quiet(tmp_path):
    # 2 cores: a one-thread run at load 2.0 had a second busy process beside it; a two-thread one did not
    timed(make_run(tmp_path, "sgd", 0), torch_threads=2, load_at_start=2.0, load_at_end=2.1)
    timed(make_run(tmp_path, "sgd", 1), torch_threads=1, load_at_start=1.0, load_at_end=2.0)
    timed(make_run(tmp_path, "sam", 0), torch_threads=1, load_at_start=1.1, load_at_end=1.2)
    runs = load_runs([tmp_path])
    assert sorted(zip(runs.optimizer, runs.seed, runs.contended)) == [("sam", 0, False), ("sgd", 0, False), ("sgd", 1, True)]


def test_time_ratios_pair_quiet_with_quiet_else_contended_with_contended_never_across(tmp_path):
    base = dict(torch_threads=1)
    timed(make_run(tmp_path / "a", "sgd", 0, train_time=10.0), **base, load_at_start=1.0, load_at_end=1.0)
    timed(make_run(tmp_path / "a", "sgd", 1, train_time=15.0), **base, load_at_start=2.0, load_at_end=2.0)
    timed(make_run(tmp_path / "a", "sam", 0, train_time=20.0), **base, load_at_start=1.0, load_at_end=1.0)
    timed(make_run(tmp_path / "a", "sam", 1, train_time=36.0), **base, load_at_start=2.0, load_at_end=2.0)
    table = table_of(tmp_path / "a").set_index("optimizer")
    assert table.loc["sam", "time vs sgd"] == 2.0 and table.loc["sam", "contended"] == "1/2"  # the quiet pair
    timed(make_run(tmp_path / "b", "sgd", 0, train_time=15.0), **base, load_at_start=2.0, load_at_end=2.0)
    timed(make_run(tmp_path / "b", "sam", 0, train_time=36.0), **base, load_at_start=2.0, load_at_end=2.0)
    timed(make_run(tmp_path / "b", "esam", 0, train_time=20.0), **base, load_at_start=1.0, load_at_end=1.0)
    table = table_of(tmp_path / "b").set_index("optimizer")
    assert table.loc["sam", "time vs sgd"] == 2.4 and table.loc["sam", "contended"] == "1/1"  # flagged
    assert table.loc["esam", "time vs sgd"] == ""  # a quiet run against a contended baseline: no ratio
    timed(make_run(tmp_path / "b", "sam", 1, train_time=300.0), **base, load_at_start=3.0, load_at_end=2.0)
    table = table_of(tmp_path / "b").set_index("optimizer")
    assert table.loc["sam", "time vs sgd"] == 2.4 and table.loc["sam", "contended"] == "2/2"  # oversubscribed: left out


def test_a_diverged_sgd_run_is_not_the_baseline(tmp_path):
    make_run(tmp_path, "sgd", 0, acc=float("nan"), status="diverged", train_time=1.0)
    make_run(tmp_path, "sgd", 0, epochs=3, train_time=5.0)  # completed, but another budget
    make_run(tmp_path, "sam", 0, train_time=20.0)
    table = table_of(tmp_path)
    sam = table[table.optimizer == "sam"].iloc[0]
    assert sam["time vs sgd"] == ""
    diverged = table[table.status == "diverged"].iloc[0]
    assert diverged["final acc (%)"] == "" and diverged["time vs sgd"] == ""
    shown = table.drop(columns=["final acc mean", "final acc std"])
    assert "nan" not in to_markdown(table).lower() and "nan" not in shown.to_csv().lower()
    make_run(tmp_path, "sgd", 1, train_time=10.0)  # a completed baseline of the same settings
    assert (
        table_of(tmp_path).set_index(["optimizer", "status", "settings"]).loc[("sam", "completed", "epochs=10"), "time vs sgd"]
        == 2.0
    )


def test_an_unfinished_run_shows_as_unfinished(tmp_path):
    make_run(tmp_path, "sgd", 0, acc=0.80)
    make_run(tmp_path, "sgd", 1, acc=None)  # config.json, no summary.json yet
    make_run(tmp_path, "sam", 0, acc=None)
    table = table_of(tmp_path)
    assert list(zip(table.optimizer, table.status, table.n)) == [
        ("sgd", "completed", 1),
        ("sgd", "unfinished", 1),
        ("sam", "unfinished", 1),
    ]
    unfinished = table[table.status == "unfinished"]
    for column in ("final acc (%)", "best acc (%)", "test loss", "time vs sgd", "images/s"):
        assert set(unfinished[column]) == {""}, column
    assert "| status |" in to_markdown(table) and "nan" not in to_markdown(table)


# ----------------------------------------------------------------------------- statistics and order


def test_mean_and_sample_std_by_hand(tmp_path):
    make_run(tmp_path / "two", "sgd", 0, acc=0.80)
    make_run(tmp_path / "two", "sgd", 1, acc=0.90)
    row = table_of(tmp_path / "two").iloc[0]
    assert (row.n, row["final acc (%)"], row["best acc (%)"]) == (2, "85.00 ± 7.07", "85.00 ± 7.07")
    assert row["final acc mean"] == pytest.approx(85.0) and row["final acc std"] == pytest.approx(7.0710678)
    make_run(tmp_path / "one", "sgd", 0, acc=0.80)
    row = table_of(tmp_path / "one").iloc[0]
    assert (row.n, row["final acc (%)"]) == (1, "80.00 ± 0.00")
    for seed, acc in enumerate((0.70, 0.80, 0.90)):
        make_run(tmp_path / "three", "sgd", seed, acc=acc)
    row = table_of(tmp_path / "three").iloc[0]
    assert (row.n, row["final acc (%)"]) == (3, "80.00 ± 10.00")  # the population std would be 8.16


def test_optimizer_order_is_the_registry_order():
    from optimizers import available_optimizers

    assert optimizer_order() == available_optimizers() and optimizer_order()[0] == "sgd"
    assert optimizer_order(["gsam", "sam", "new_one", "sgd", "sam", "other"]) == ["sgd", "sam", "gsam", "new_one", "other"]


def test_plot_legends_follow_the_table_order(tmp_path, monkeypatch):
    names = ["look_layer_sam", "gsam", "sgd", "esam", "sam", "asam"]
    runs = []
    for optimizer in names:
        run = make_run(tmp_path, optimizer, 0)
        rows = [{"epoch": e, "test_acc": 0.5 + 0.1 * e, "epoch_time_s": 1.0} for e in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    legends = []

    def record(fig, path):  # the per-optimizer figure names its rows on the y axis, the others in a legend
        legend = fig.axes[0].get_legend()
        texts = legend.get_texts() if legend is not None else fig.axes[0].get_yticklabels()
        legends.append([t.get_text().split(" (n=")[0] for t in texts])
        plots.plt.close(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", record)
    plots.write_plots(runs, tmp_path / "fig")
    table = table_of(tmp_path)
    assert list(table.optimizer) == optimizer_order(names) == ["sgd", "sam", "asam", "esam", "gsam", "look_layer_sam"]
    assert legends == [list(table.optimizer)] * 3


def test_time_ratios_come_from_each_runs_step_time_not_its_train_time(tmp_path):
    """A run slowed by a burst of other work has a long train time but the same step time (the median
    over epochs of the epoch's mean step): the ratio follows the step times (0.03 / 0.0105), not the
    train times (100 / 10)."""
    for optimizer, seed, step, total in [
        ("sgd", 0, 0.010, 10.0),
        ("sgd", 1, 0.011, 11.0),
        ("sam", 0, 0.030, 100.0),
        ("sam", 1, 0.030, 30.0),
    ]:
        run = make_run(tmp_path, optimizer, seed, train_time=total)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "step_time_s": step}))
    table = table_of(tmp_path).set_index("optimizer")
    assert table.loc["sam", "time vs sgd"] == round(0.030 / 0.0105, 2)
    # its relative standard error: sgd's two step times differ by 10% (se of the mean 4.76% of it), sam's agree
    assert table.loc["sam", "time ± (%)"] == round(100 * (0.001 / 2**0.5) / 0.0105 / 2**0.5, 1) == 4.8


def test_a_ratio_never_divides_a_step_time_by_a_training_time(tmp_path):
    """sgd's runs predate the recorded step time, sam's do not: both sides then use their training
    time (30 / 10), never sam's 0.03 s step over sgd's 10 s of training."""
    make_run(tmp_path, "sgd", 0, train_time=10.0)
    for seed in (0, 1):
        run = make_run(tmp_path, "sam", seed, train_time=30.0)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "step_time_s": 0.03}))
    assert table_of(tmp_path).set_index("optimizer").loc["sam", "time vs sgd"] == 3.0


def test_a_ratio_its_runs_cannot_pin_to_15_percent_is_flagged_imprecise(tmp_path):
    """Flagged: two standard errors over 15% (sgd's step times 0.010 and 0.013: se of the mean 11.5%
    of it), or runs shorter than MIN_TIMED_S however well they agree; the baseline's own row, 1 by
    definition, never."""

    def runs(folder, times, train_time):
        for (optimizer, seed), step in zip([("sgd", 0), ("sgd", 1), ("sam", 0), ("sam", 1)], times):
            run = make_run(tmp_path / folder, optimizer, seed, train_time=train_time)
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "step_time_s": step}))
        return table_of(tmp_path / folder).set_index("optimizer")

    table = runs("spread", [0.010, 0.013, 0.023, 0.023], train_time=60.0)
    assert table.loc["sam", "time ± (%)"] == round(100 * (0.003 / 2) / 0.0115, 1) == 13.0
    assert list(table.imprecise) == ["", "yes"]
    table = runs("short", [0.0112, 0.0118, 0.023, 0.023], train_time=MIN_TIMED_S / 2)
    assert table.loc["sam", "time ± (%)"] == round(100 * (0.0006 / 2) / 0.0115, 1) == 2.6
    assert list(table.imprecise) == ["", "yes"]
    # the same agreeing runs, long enough: trusted, and no column at all
    table = runs("long", [0.0112, 0.0118, 0.023, 0.023], train_time=MIN_TIMED_S)
    assert table.loc["sam", "time vs sgd"] == 2.0 and "imprecise" not in table


def test_a_runs_step_time_counts_every_kind_of_step(tmp_path):
    """LookSAM ascends on one step in k: its median step costs what an SGD step does, its mean step
    (1 + 1/k) times as much.  The summary's step time is the median over epochs of the mean step."""
    from bench.loop.train import train

    config = RunConfig(
        dataset="digits",
        arch="mlp",
        optimizer="looksam",
        epochs=3,
        batch_size=128,
        cpu=True,
        output_dir=str(tmp_path),
        save_every_epochs=0,
    )
    run = train(config).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [rows[0]["step"]] + [b["step"] - a["step"] for a, b in zip(rows, rows[1:])]
    means = [r["epoch_time_s"] / n for r, n in zip(rows, steps)]
    assert [r["step_time_mean_s"] for r in rows] == pytest.approx(means)
    assert json.loads((run / "summary.json").read_text())["step_time_s"] == pytest.approx(sorted(means)[1])


def test_time_ratios_compare_runs_at_the_same_thread_count_only(tmp_path):
    """Threads are operational (not in a run's identity), so an sgd run with 2 threads and a sam run with
    1 are the same settings; their step times are not comparable: no ratio, rather than a wrong one."""
    for optimizer, seed, threads, step in [
        ("sgd", 0, 1, 0.010),
        ("sgd", 1, 2, 0.006),
        ("sam", 0, 1, 0.020),
        ("sam", 1, 1, 0.022),
        ("asam", 0, 2, 0.012),
        ("asam", 1, 1, 0.021),
    ]:
        run = make_run(tmp_path, optimizer, seed)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "step_time_s": step, "torch_threads": threads, "world_size": 1}))
    table = table_of(tmp_path).set_index("optimizer")
    assert table.loc["sam", "time vs sgd"] == 2.1  # against the 1-thread sgd run: median 0.021 / 0.010
    assert table.loc["asam", "time vs sgd"] == ""  # its runs used 1 and 2 threads


def test_the_reproduction_table_counts_only_finite_accuracies_and_reports_failures_apart():
    """Four runs of SAM: 90 and 92 completed, one completed with no accuracy (NaN), one diverged at 50.
    n is the three finite values behind the mean (77.33), failed the two runs that diverged or have none."""
    from types import SimpleNamespace

    from bench.report.reproduction import reproduction_table

    configs = [SimpleNamespace(optimizer="sam", run_id=lambda i=i: f"r{i}") for i in range(4)]
    reported = {"sam": SimpleNamespace(accuracy=90.0, metric="last", source="s", spread=1.0, tolerance=None)}
    recipe = SimpleNamespace(name="x", reported=reported, runs=lambda sets, equal_passes: configs)
    runs = pd.DataFrame(
        {
            "run_id": ["r0", "r1", "r2", "r3"],
            "status": ["completed", "completed", "completed", "diverged"],
            "final_test_acc": [0.90, 0.92, float("nan"), 0.50],
        }
    )
    (row,) = reproduction_table([recipe], runs).to_dict("records")
    assert (row["n"], row["failed"], row["measured acc (%)"]) == (3, 2, f"{(90 + 92 + 50) / 3:.2f} ± 23.69")
    assert row["status"] == "not resolved"  # a spread of 23.69 points resolves nothing
    runs["final_test_acc"] = float("nan")
    (row,) = reproduction_table([recipe], runs).to_dict("records")
    assert (row["n"], row["failed"], row["status"], row["measured acc (%)"]) == (0, 4, "failed", "")


@pytest.mark.parametrize(
    "accuracies, tolerance, status, difference",
    [
        # mean 90.0, sd 0.1, se 0.0577, t(2) 4.303: [89.75, 90.25] against 90 within ±0.5
        ([0.899, 0.900, 0.901], 0.5, "reproduced", "+0.00 [-0.25, +0.25]"),
        ([0.899, 0.900, 0.901], 0.2, "not resolved", "+0.00 [-0.25, +0.25]"),  # the interval pokes out of ±0.2
        ([0.880, 0.881, 0.882], 0.5, "below", "-1.90 [-2.15, -1.65]"),  # wholly below -0.5
        ([0.910, 0.911, 0.912], 0.5, "above", "+1.10 [+0.85, +1.35]"),
        ([0.88, 0.90, 0.92], 0.5, "not resolved", "+0.00 [-4.97, +4.97]"),  # centred on it, far too wide to tell
        ([0.900], 0.5, "not resolved", "+0.00"),  # one run: no interval, no match
    ],
)
def test_a_reproduction_needs_its_whole_interval_within_the_tolerance(accuracies, tolerance, status, difference):
    """Reported 90.0%: "reproduced" only where the 95% t interval of measured minus reported lies within the
    stated tolerance, "below"/"above" where it lies wholly beyond it, else "not resolved"; hand-derived."""
    from types import SimpleNamespace

    from bench.report.reproduction import reproduction_table

    configs = [SimpleNamespace(optimizer="sam", run_id=lambda i=i: f"r{i}") for i in range(len(accuracies))]
    reported = {"sam": SimpleNamespace(accuracy=90.0, metric="last", source="s", spread=None, tolerance=tolerance)}
    recipe = SimpleNamespace(name="x", reported=reported, runs=lambda sets, equal_passes: configs)
    runs = pd.DataFrame(
        {"run_id": [f"r{i}" for i in range(len(accuracies))], "status": "completed", "final_test_acc": accuracies}
    )
    (row,) = reproduction_table([recipe], runs).to_dict("records")
    assert (row["status"], row["difference [95% CI]"], row["tolerance"]) == (status, difference, f"±{tolerance:g}")
