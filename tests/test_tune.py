"""Tuning with an equal budget: trials on a validation split, the choice by validation accuracy only,
final runs on the full training set, resumable, with tables that say what was tuned."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.cli.flags import run_parser
from bench.cli.main import main
from bench.cli.run import recipe_config
from bench.io import read_json, write_json
from bench.studies.recipes import load_recipe
from bench.studies.tune import choices, final_configs, plan
from bench.studies.tuning_tables import budget

TINY = """
name = "tiny_tune"
description = "a tiny tuning"
[config]
dataset = "digits"
arch = "mlp"
epochs = 1
batch_size = 64
lr = 0.05
cpu = true
[tune]
val_fraction = 0.2
seeds = [0]
final_seeds = [1]
[tune.grid.sgd]
lr = [0.005, 0.2]
[tune.grid.sam]
rho = [0.01, 0.5]
"""
GRID = {"sgd": ("lr", [0.005, 0.2]), "sam": ("rho", [0.01, 0.5])}


def write_recipe(folder: Path, text: str = TINY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_tune.toml"
    path.write_text(text)
    return path


def runs_under(folder: Path) -> list[tuple[dict, dict | None]]:
    """(config.json, summary.json or None) of every run directory under ``folder``."""
    return [
        (read_json(c), read_json(c.parent / "summary.json") if (c.parent / "summary.json").is_file() else None)
        for c in sorted(folder.glob("*/config.json"))
    ]


def tuned_value(config: dict) -> float:
    key = GRID[config["optimizer"]][0]
    return config["hyperparameters"].get(key, config.get(key))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    recipe = write_recipe(root)
    argv = ["tune", str(recipe), "--output_dir", str(root / "runs"), "--results_dir", str(root / "results")]
    assert main(argv) == 0
    return root, argv


def test_the_choice_is_the_best_trial_val_accuracy_and_final_runs_use_the_full_training_set(tuned):
    root, _ = tuned
    trials = runs_under(root / "runs" / "trials")
    assert len(trials) == 4 and all(c["val_fraction"] == 0.2 and c["seed"] == 0 for c, _ in trials)
    expected = {}
    for optimizer, (_, values) in GRID.items():
        scores = {tuned_value(c): s["final_val_acc"] for c, s in trials if c["optimizer"] == optimizer}
        assert sorted(scores) == sorted(values)
        expected[optimizer] = max(values, key=lambda v: (scores[v], -values.index(v)))  # the earlier among equals
    finals = runs_under(root / "runs" / "final")
    assert sorted(c["optimizer"] for c, _ in finals) == ["sam", "sgd"]
    for config, summary in finals:
        assert config["val_fraction"] == 0.0 and config["seed"] == 1
        assert tuned_value(config) == expected[config["optimizer"]]
        assert "final_val_acc" not in summary and summary["status"] == "completed"
    table = pd.read_csv(root / "results" / "tiny_tune_tuned.csv").set_index("optimizer")
    for optimizer, (key, _) in GRID.items():
        assert table.loc[optimizer, "tuned"] == f"{key}={expected[optimizer]:g}"
    assert "equal budget: 2 trials per optimizer" in (root / "results" / "tiny_tune_tuned.md").read_text()


def test_the_tuning_markdown_lists_every_trial_and_the_choice(tuned):
    root, _ = tuned
    text = (root / "results" / "tiny_tune_tuning.md").read_text()
    assert text.startswith("# tiny_tune: tuning") and "python launch.py tune" in text
    for config, _ in runs_under(root / "runs" / "trials"):
        assert f"`{config['run_id']}`" in text
    for optimizer, (key, values) in GRID.items():
        assert f"* {optimizer}: {key} = [{', '.join(f'{v:g}' for v in values)}]" in text
        for value in values:
            assert f"| {optimizer} | {key}={value:g} |" in text
    assert text.count("| yes, on an edge (") == 2  # two-point grids: every choice sits on an edge, and says so
    assert (root / "results" / "tiny_tune_tuned_acc_final.png").stat().st_size > 0  # the final runs' figures


def test_a_second_invocation_trains_nothing_and_has_no_pending_command(tuned, capsys):
    root, argv = tuned
    summaries = sorted((root / "runs").glob("*/*/summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert len(list((root / "runs").glob("*/*/summary.json"))) == 6
    capsys.readouterr()
    assert main([*argv, "--print_commands"]) == 0
    assert capsys.readouterr().out.strip() == ""


def command_config(line: str):
    """The configuration a printed command runs (parsed as launch.py would, without training)."""
    argv = line.split()[3:]
    parser = run_parser()
    return recipe_config(parser, parser.parse_args(argv))


def test_print_commands_lists_pending_trials_then_pending_final_runs(tuned, tmp_path, capsys):
    root, _ = tuned
    recipe = write_recipe(tmp_path)
    assert main(["tune", str(recipe), "--output_dir", str(tmp_path / "fresh"), "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("accelerate launch launch.py --recipe") for line in lines)
    assert all("--set val_fraction=0.2" in line and "--resume auto" in line for line in lines)
    trial_ids = {c.run_id() for c in plan(load_recipe(str(recipe)), [], tmp_path / "fresh").trials()}
    assert {command_config(line).run_id() for line in lines} == trial_ids  # each command runs its own trial

    copy = tmp_path / "copy"
    shutil.copytree(root / "runs", copy)
    (lost,) = [c.parent for c in (copy / "final").glob("*/config.json") if read_json(c)["optimizer"] == "sam"]
    shutil.rmtree(lost)
    assert main(["tune", str(recipe), "--output_dir", str(copy), "--print_commands"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    # a final run trains on the whole training set, the recipe's own: no validation setting to spell
    assert "--set optimizer=sam" in line and "val_fraction" not in line
    assert command_config(line).run_dir() == lost


def plant(config, val: float | None, test: float) -> None:
    """A finished trial whose validation and test accuracies are given."""
    write_json(config.run_dir() / "config.json", config.to_dict())
    write_json(
        config.run_dir() / "summary.json",
        {
            "status": "completed",
            "final_val_acc": val,
            "best_val_acc": val,
            "final_test_acc": test,
            "best_test_acc": test,
            "train_time_s": 1.0,
        },
    )


def test_the_chooser_reads_validation_accuracy_only(tmp_path):
    tuning = plan(load_recipe(str(write_recipe(tmp_path))), [], tmp_path / "runs")
    (low, high), (tie_a, tie_b) = tuning.points["sgd"], tuning.points["sam"]
    plant(low.trials[0], val=0.9, test=0.1)
    plant(high.trials[0], val=0.5, test=0.99)
    plant(tie_a.trials[0], val=0.7, test=0.2)
    plant(tie_b.trials[0], val=0.7, test=0.9)
    chosen = choices(tuning)
    assert chosen["sgd"] is low and chosen["sam"] is tie_a  # test accuracy disagrees; ties: the earlier point
    plant(low.trials[0], val=None, test=1.0)  # no validation accuracy: the worst score, whatever the test says
    assert choices(tuning)["sgd"] is high


def test_unequal_grids_are_refused_unless_the_recipe_allows_them(tmp_path, capsys):
    unequal = TINY.replace("rho = [0.01, 0.5]", "rho = [0.01, 0.1, 0.5]")
    recipe = write_recipe(tmp_path, unequal)
    assert main(["tune", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unequal budgets (sgd 2 points, sam 3 points)" in err
    allowed = write_recipe(tmp_path / "allowed", unequal.replace("[tune]\n", "[tune]\nequal_budget = false\n"))
    tuning = plan(load_recipe(str(allowed)), [], tmp_path / "runs")
    assert len(tuning.trials()) == 5
    assert budget(tuning).startswith("budgets differ (equal_budget = false): sgd 2 trials, sam 3 trials")


@pytest.mark.parametrize(
    "sets, message",
    [
        (["rho=0.1"], "--set rho would override"),
        (["seed=[0,1]"], "takes one value"),
        (["val_fraction=0.3"], "--set val_fraction would override"),
    ],
)
def test_sets_that_would_change_the_tuning_are_refused(tmp_path, capsys, sets, message):
    recipe = write_recipe(tmp_path)
    assert main(["tune", str(recipe), "--print_commands", *(f"--set={s}" for s in sets)]) == 2
    assert message in capsys.readouterr().err


def test_the_digits_tuning_recipe_tunes_the_learning_rate_and_a_knob_of_every_optimizer(tmp_path):
    tuning = plan(load_recipe("digits_tune"), [], tmp_path)
    sizes = {name: len(points) for name, points in tuning.points.items()}
    assert set(sizes) == {"sgd", "sam", "asam", "looksam", "sgd at 2x epochs"} and set(sizes.values()) == {9}
    assert all(list(grid)[0] == "lr" and len(grid) == 2 for grid in tuning.grids.values())
    assert json.dumps(tuning.grids["looksam"]) == '{"lr": [0.02, 0.05, 0.1], "alpha": [0.1, 0.3, 0.7]}'
    assert tuning.extend_edges == 2 and tuning.factors == {"sgd at 2x epochs": 2}


def test_trial_epochs_shortens_the_trials_and_their_commands_only(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY.replace("epochs = 1", "epochs = 3").replace("[tune]\n", "[tune]\ntrial_epochs = 2\n"))
    tuning = plan(load_recipe(str(recipe)), [], tmp_path / "runs")
    assert {c.epochs for c in tuning.trials()} == {2}
    for point in tuning.points["sam"]:
        plant(point.trials[0], val=0.5, test=0.5)
    assert main(["tune", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and {command_config(line).epochs for line in lines} == {2}  # the sgd trials
    assert {command_config(line).run_id() for line in lines} == {c.run_id() for p in tuning.points["sgd"] for c in p.trials}
    for point in tuning.points["sgd"]:
        plant(point.trials[0], val=0.5, test=0.5)
    assert main(["tune", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 0
    finals = capsys.readouterr().out.strip().splitlines()
    assert len(finals) == 2 and {command_config(line).epochs for line in finals} == {3}  # the final runs: the recipe's
    assert "trials of 2 epochs (final runs: 3)" in budget(tuning)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("trial_epochs = 0\n", "trial_epochs must be a positive integer, got 0"),
        ("trial_epochs = 5\n", "trial_epochs 5 exceeds the final runs' 1 epochs (sgd)"),
    ],
)
def test_bad_trial_epochs_are_refused_in_one_line(tmp_path, capsys, edit, message):
    recipe = write_recipe(tmp_path, TINY.replace("[tune]\n", "[tune]\n" + edit))
    assert main(["tune", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_printed_final_runs_go_seed_by_seed_across_optimizers(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY.replace("final_seeds = [1]", "final_seeds = [0, 1]"))
    tuning = plan(load_recipe(str(recipe)), [], tmp_path / "runs")
    for config in tuning.trials():
        plant(config, val=0.5, test=0.5)
    assert main(["tune", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 0
    runs = [command_config(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(c.optimizer, c.seed) for c in runs] == [("sgd", 0), ("sam", 0), ("sgd", 1), ("sam", 1)]


# -- interior optima and the compute-matched baseline -------------------------------------------------


def test_beyond_steps_past_an_edge_with_the_grids_own_spacing():
    from bench.studies.tune import _beyond

    assert _beyond([0.02, 0.05, 0.1, 0.2], -1) == pytest.approx(0.008) and _beyond([0.02, 0.05, 0.1, 0.2], 1) == 0.4
    assert _beyond([2, 4], -1) == 1 and _beyond([2, 5], 1) == 12  # integers: geometric, rounded
    assert _beyond([10, 30, 100], 1) == 333 and _beyond([10, 30, 100], -1) == 3  # log-spaced integers
    assert _beyond([2, 4, 6], 1) == 8 and _beyond([0.1, 0.2, 0.3], 1) == 0.4  # evenly spaced: arithmetic
    assert _beyond([1, 2], -1) == 0  # geometric 0.5, rounded
    assert _beyond([0.0, 0.5], 1) == 1.0 and _beyond([0.0, 0.5], -1) == -0.5  # a zero: arithmetic


def test_a_choice_on_an_edge_extends_its_grid_there_up_to_the_limit(tmp_path):
    recipe = write_recipe(tmp_path, TINY.replace("final_seeds = [1]", "final_seeds = [1]\nextend_edges = 2"))
    tuning = plan(load_recipe(str(recipe)), [], tmp_path / "runs")
    sgd_low, sgd_high = tuning.points["sgd"]
    sam_low, sam_high = tuning.points["sam"]
    plant(sgd_low.trials[0], val=0.6, test=0.5)
    plant(sgd_high.trials[0], val=0.8, test=0.5)  # sgd: its highest lr, on the edge
    plant(sam_low.trials[0], val=0.7, test=0.5)
    plant(sam_high.trials[0], val=0.7, test=0.5)  # sam: a tie, the earlier point: its lowest rho
    from bench.studies.tune import extend

    added = extend(tuning, 1)
    assert [c.lr for c in added["sgd"]] == [8.0] and [c.hyperparameters["rho"] for c in added["sam"]] == [0.0002]
    assert tuning.grids["sgd"]["lr"] == [0.005, 0.2, 8.0] and tuning.points["sgd"][-1].extension == 1
    (new_sgd,) = [p for p in tuning.points["sgd"] if p.extension]
    plant(new_sgd.trials[0], val=0.7, test=0.99)  # worse than lr 0.2: sgd's choice is interior now
    (new_sam,) = [p for p in tuning.points["sam"] if p.extension]
    plant(new_sam.trials[0], val=0.9, test=0.1)  # better: sam's choice is on the (new) edge again
    again = extend(tuning, 2)
    assert list(again) == ["sam"] and choices(tuning)["sgd"] is sgd_high
    from bench.studies.tuning_tables import _chosen

    plant(tuning.points["sam"][-1].trials[0], val=0.95, test=0.1)
    assert _chosen(tuning, choices(tuning)["sam"]) == "yes, on an edge (rho lowest)"  # past the limit: marked
    assert _chosen(tuning, choices(tuning)["sgd"]) == "yes"


def test_an_extension_outside_the_settings_range_is_not_added(tmp_path):
    text = TINY.replace("[tune.grid.sam]\nrho = [0.01, 0.5]", "[tune.grid.esam]\nbeta = [0.5, 1.0]")
    tuning = plan(load_recipe(str(write_recipe(tmp_path, text))), [], tmp_path / "runs")
    for point, val in zip([*tuning.points["sgd"], *tuning.points["esam"]], [0.9, 0.5, 0.5, 0.9]):
        plant(point.trials[0], val=val, test=0.5)
    from bench.studies.tune import extend

    added = extend(tuning, 1)  # sgd's lowest lr extends; ESAM's beta 1.0 is its range's end: beta 1.5 is refused
    assert list(added) == ["sgd"] and tuning.grids["esam"]["beta"] == [0.5, 1.0]


def test_k_fold_trials_run_every_seed_on_every_fold_and_the_choice_takes_their_mean(tmp_path, capsys):
    text = TINY.replace("val_fraction = 0.2\nseeds = [0]", "folds = 3\nseeds = [0, 1]")
    tuning = plan(load_recipe(str(write_recipe(tmp_path, text))), [], tmp_path / "runs")
    low, high = tuning.points["sgd"]
    assert [(c.seed, c.val_fold) for c in low.trials] == [(s, f) for s in (0, 1) for f in range(3)]
    assert {c.val_fraction for c in low.trials} == {1 / 3} and tuning.trials_per_point == 6
    assert len({c.run_dir() for p in tuning.points["sgd"] for c in p.trials}) == 12  # every trial its own run
    for c, val in zip(low.trials, [0.9, 0.2, 0.2, 0.9, 0.2, 0.2]):  # one lucky fold per seed: mean 0.433
        plant(c, val=val, test=0.5)
    for c in high.trials:
        plant(c, val=0.5, test=0.5)
    assert choices(tuning)["sgd"] is high  # the mean over seeds and folds, not the best trial
    assert "12 trials per optimizer, 2 grid points × trial seeds [0, 1] × 3 validation folds" in budget(tuning)
    both = write_recipe(tmp_path, text.replace("folds = 3", "folds = 3\nval_fraction = 0.2"))
    assert main(["tune", str(both), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 2
    assert "folds 3 holds out 1/3 per fold; drop val_fraction" in capsys.readouterr().err


def test_equal_passes_tunes_the_baseline_again_for_twice_the_epochs(tmp_path):
    text = TINY.replace("epochs = 1\n", "epochs = 2\n").replace(
        "final_seeds = [1]", "final_seeds = [1]\nequal_passes = {sgd = 2}"
    )
    tuning = plan(load_recipe(str(write_recipe(tmp_path, text))), [], tmp_path / "runs")
    matched = tuning.points["sgd at 2x epochs"]
    assert [p.values for p in matched] == [p.values for p in tuning.points["sgd"]]
    assert {c.epochs for p in matched for c in p.trials} == {4} and {
        c.epochs for p in tuning.points["sgd"] for c in p.trials
    } == {2}
    assert {c.optimizer for p in matched for c in p.trials} == {"sgd"}
    assert "sgd at 2x epochs: the same grid for 2x the epochs (equal passes)" in budget(tuning)


def test_bad_tuning_extensions_are_refused_in_one_line(tmp_path, capsys):
    for edit, message in [
        ("equal_passes = {sgd = 1}", "equal_passes maps an optimizer"),
        ("equal_passes = {adamw = 2}", "equal_passes names adamw, which has no tune.grid"),
        ("extend_edges = -1", "extend_edges must be an integer >= 0"),
    ]:
        recipe = write_recipe(tmp_path, TINY.replace("final_seeds = [1]", f"final_seeds = [1]\n{edit}"))
        assert main(["tune", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


def test_the_tables_regenerate_from_the_per_run_files_alone(tuned, tmp_path):
    """tune --from_records: the choice replayed from the trials' records, every table byte for byte, no run folder."""
    root, argv = tuned
    results = root / "results"
    assert (results / "tiny_tune_tuning_runs.csv").is_file() and (results / "tiny_tune_tuned_runs.csv").is_file()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("tiny_tune_tuning_runs.csv", "tiny_tune_tuned_runs.csv"):
        shutil.copy(results / name, out / name)
    moved = root / "runs_moved"
    (root / "runs").rename(moved)  # no run folder
    try:
        recipe = argv[1]
        assert main(["tune", recipe, "--output_dir", str(root / "runs"), "--results_dir", str(out), "--from_records"]) == 0
    finally:
        moved.rename(root / "runs")
    for name in (
        "tiny_tune_tuning.md",
        "tiny_tune_tuning_runs.csv",
        *(f"tiny_tune_tuned{s}" for s in (".md", ".csv", ".tex", "_runs.csv")),
    ):
        assert (out / name).read_bytes() == (results / name).read_bytes(), name


def test_a_second_tuning_seed_reruns_the_choice_and_sets_it_beside_the_first(tuned, tmp_path):
    root, argv = tuned
    results = root / "results"
    assert main([*argv, "--tuning_seed", "1"]) == 0
    trials = [c for c, _ in runs_under(root / "runs" / "trials") if c["seed"] >= 1000]
    assert len(trials) == 4 and {(c["seed"], c["split_seed"]) for c in trials} == {(1000, 1)}
    text = (results / "tiny_tune_tuning_seed1.md").read_text()
    assert "## Against tuning seed 0" in text and "of 2 choices differ from tuning seed 0's" in text
    # one final seed a side: no claim has two seeds to pair (digits_tune_tuning_seed1.md shows the verdicts compared)
    assert "## Verdicts against tuning seed 0\n\nNo claim compares two optimizers that both tunings ran." in text
    assert (results / "tiny_tune_tuned_seed1.md").is_file() and (results / "tiny_tune_tuned.md").is_file()
    # and from the per-run files alone, both tunings' files byte for byte
    out = tmp_path / "out"
    out.mkdir()
    for name in (
        "tiny_tune_tuning_runs.csv",
        "tiny_tune_tuned_runs.csv",
        "tiny_tune_tuning_seed1_runs.csv",
        "tiny_tune_tuned_seed1_runs.csv",
    ):
        shutil.copy(results / name, out / name)
    at = argv.index("--results_dir")
    assert main([*argv[:at], "--results_dir", str(out), "--tuning_seed", "1", "--from_records"]) == 0
    for name in ("tiny_tune_tuning_seed1.md", "tiny_tune_tuned_seed1.md", "tiny_tune_tuned_seed1_runs.csv"):
        assert (out / name).read_bytes() == (results / name).read_bytes(), name


def test_tune_grids_take_any_spelling_and_equal_passes_scale_an_epochs_axis(tmp_path, capsys):
    """[tune.grid.SAM] is sam's grid (its [optimizers.sam] settings apply); an epochs axis of an equal-passes
    optimizer is trained for the factor times each value, so the compute-matched trials differ from sgd's own."""
    text = TINY.replace("[tune.grid.sam]", "[tune.grid.SAM]").replace("[tune.grid.sgd]\nlr = [0.005, 0.2]", "")
    text += "[optimizers.sam]\nlr = 0.3\n"
    tuning = plan(load_recipe(str(write_recipe(tmp_path / "a", text))), [], tmp_path / "runs")
    assert {c.lr for p in tuning.points["sam"] for c in p.trials} == {0.3}
    text = TINY.replace("[tune.grid.sgd]\nlr = [0.005, 0.2]", "[tune.grid.sgd]\nepochs = [1, 2]")
    text = text.replace("final_seeds = [1]", "final_seeds = [1]\nequal_passes = {sgd = 2}")
    tuning = plan(load_recipe(str(write_recipe(tmp_path / "b", text))), [], tmp_path / "runs")
    assert [c.epochs for p in tuning.points["sgd"] for c in p.trials] == [1, 2]
    assert [c.epochs for p in tuning.points["sgd at 2x epochs"] for c in p.trials] == [2, 4]
    chosen = {name: points[-1] for name, points in tuning.points.items()}
    assert [c.epochs for c in final_configs(tuning, chosen)["sgd at 2x epochs"]] == [4]
