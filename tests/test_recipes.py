"""Recipes, sweeps (resumable, never duplicating a run), reproduction tables, label noise, ECE."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from launching import KILLED_AFTER

from bench.cli.main import main
from bench.config import ConfigError
from bench.data.datasets import ImageDataset
from bench.data.prepare import with_label_noise
from bench.io import read_json
from bench.report.reproduction import reproduction_table
from bench.report.runs import load_runs
from bench.studies.recipes import available_recipes, load_recipe, parse_assignment

ROOT = Path(__file__).resolve().parents[1]
TINY = """
name = "tiny"
description = "a tiny grid"
[config]
dataset = "digits"
arch = "mlp"
epochs = 2
batch_size = 64
lr = 0.05
save_every_steps = 5
cpu = true
[grid]
optimizer = ["sgd", "sam"]
seed = [0, 1]
[optimizers.sam]
rho = 0.1
[reported.sam]
accuracy = 50.0
metric = "last"
spread = 100.0
source = "a test"
[reported.sgd]
accuracy = 99.9
metric = "best"
source = "a test"
"""


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_expands_into_valid_runs(name):
    recipe = load_recipe(name)
    runs = recipe.runs()
    assert runs and len({r.run_id() for r in runs}) == len(runs)
    for optimizer in recipe.reported:
        assert any(r.optimizer == optimizer for r in runs)


def test_set_overrides_fields_hyperparameters_and_grid_axes():
    recipe = load_recipe("digits")
    (run,) = recipe.runs(["optimizer=sam", "seed=4", "rho=0.2", "epochs=3"])
    assert (run.optimizer, run.seed, run.hyperparameters, run.epochs) == ("sam", 4, {"rho": 0.2}, 3)
    assert len(recipe.runs(["seed=[0,1]", "optimizer=['sgd','sam','gsam']"])) == 6
    assert parse_assignment("dataset=cifar10") == ("dataset", "cifar10")
    with pytest.raises(ConfigError, match="rho must be >= 0"):
        recipe.runs(["optimizer=sam", "seed=0", "rho=-1"])
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("nope")


def test_a_recipe_extends_another_merging_table_by_table(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "noisy.toml").write_text(
        'name = "noisy"\nextends = "' + str(tmp_path / "tiny.toml") + '"\ndescription = "tiny, noisy"\n'
        "[config]\nlabel_noise = 0.2\nepochs = 3\n[optimizers.sam]\nseed = 5\n"
    )
    tiny, noisy = load_recipe(str(tmp_path / "tiny.toml")), load_recipe(str(tmp_path / "noisy.toml"))
    assert (noisy.name, noisy.description) == ("noisy", "tiny, noisy")
    assert noisy.config == {**tiny.config, "label_noise": 0.2, "epochs": 3}
    assert noisy.grid == tiny.grid and noisy.reported == tiny.reported
    assert noisy.optimizers == {"sam": {"rho": 0.1, "seed": 5}}
    # the study's noisy regimes are the clean one with noisy labels, nothing else
    fit = load_recipe("cifar10_fit_cpu")
    for name, noise in (("cifar10_noise20_cpu", 0.2), ("cifar10_noise40_cpu", 0.4)):
        regime = load_recipe(name)
        assert regime.config == {**fit.config, "label_noise": noise}
        assert (regime.grid, regime.optimizers, regime.tune) == (fit.grid, fit.optimizers, fit.tune)
    (tmp_path / "loop.toml").write_text(f'extends = "{tmp_path / "loop.toml"}"\ndescription = "x"\n')
    with pytest.raises(ConfigError, match="extends it back"):
        load_recipe(str(tmp_path / "loop.toml"))
    (tmp_path / "orphan.toml").write_text('extends = "no_such_recipe"\n')
    with pytest.raises(ConfigError, match="unknown recipe 'no_such_recipe'"):
        load_recipe(str(tmp_path / "orphan.toml"))


def test_equal_passes_runs_an_optimizer_again_for_a_multiple_of_the_epochs(tmp_path):
    from bench.studies.sweep import run_argv

    (tmp_path / "tiny.toml").write_text(TINY + "[equal_passes]\nsgd = 2\n")
    recipe = load_recipe(str(tmp_path / "tiny.toml"))
    runs = recipe.runs()
    assert [(r.optimizer, r.seed, r.epochs) for r in runs] == [
        ("sgd", 0, 2), ("sgd", 0, 4), ("sgd", 1, 2), ("sgd", 1, 4), ("sam", 0, 2), ("sam", 1, 2)
    ]  # fmt: skip
    assert len(recipe.runs(equal_passes=False)) == 4 and len(recipe.runs(["epochs=3"])) == 4
    for run in runs:  # each run's command names it alone
        argv = run_argv(recipe, [], run)
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert f"epochs={run.epochs}" in sets
        (again,) = recipe.runs(sets)
        assert again.run_id() == run.run_id()
    (tmp_path / "bad.toml").write_text(TINY + "[equal_passes]\nsgd = 1\n")
    with pytest.raises(ConfigError, match="equal_passes.sgd must be how many times the epochs"):
        load_recipe(str(tmp_path / "bad.toml"))


def test_bsam_keeps_its_own_step_size_in_the_suites():
    (run,) = load_recipe("digits").runs(["optimizer=bsam", "seed=0"])
    assert run.lr == 0.5


def tiny_recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def table_without_timing(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    return table.drop(columns=[c for c in table.columns if "time" in c or "images/s" in c or c in ("contended", "imprecise")])


def test_printed_commands_run_in_one_process_give_the_sequential_sweeps_table(tmp_path, capsys):
    """scripts/run_commands.py (the CPU study's lanes) runs the printed command lines in one process, or in lanes
    taking them from one queue: the same runs, the same table as a sequential sweep; a line that is not a
    launch.py command is refused whole."""
    recipe = tiny_recipe(tmp_path)
    assert (
        main(["sweep", str(recipe), "--output_dir", str(tmp_path / "seq"), "--results_dir", str(tmp_path / "seq_results")]) == 0
    )
    capsys.readouterr()
    assert main(["sweep", str(recipe), "--output_dir", str(tmp_path / "lanes"), "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    script = [sys.executable, str(ROOT / "scripts" / "run_commands.py"), "--threads", "1"]
    # the first run in one process, the other three in two lanes sharing one queue
    for lanes, part, said in (
        (["--lanes", "1"], lines[:1], "1 of 1 runs done"),
        (["--lanes", "2"], lines[1:], "3 of 3 runs done"),
    ):
        done = subprocess.run([*script, *lanes], input="\n".join(part), capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert said in done.stdout
    assert (
        main(["sweep", str(recipe), "--output_dir", str(tmp_path / "lanes"), "--results_dir", str(tmp_path / "lanes_results")])
        == 0
    )
    seq, lanes = (table_without_timing(tmp_path / d / "tiny.csv") for d in ("seq_results", "lanes_results"))
    pd.testing.assert_frame_equal(seq, lanes)
    refused = subprocess.run(script, input="rm -rf /\n", capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert refused.returncode == 2 and "not a launch.py command line" in refused.stderr
    # a line that leaves through SystemExit (--help) does not end the lane, and a refused line fails alone
    lines = "python launch.py --help\npython launch.py --no_such_flag 1\n"
    one_bad = subprocess.run(script, input=lines, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert one_bad.returncode == 1 and "1 of 2 runs done" in one_bad.stdout, one_bad.stderr[-2000:]
    assert "line 2 failed (2)" in one_bad.stderr


def test_a_sweep_skips_finished_runs_and_an_interrupted_one_gives_the_same_table(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["sweep", str(recipe), "--output_dir", str(whole / "runs"), "--results_dir", str(whole)]) == 0
    summaries = sorted((whole / "runs").glob("*/summary.json"))
    assert len(summaries) == 4
    stamps = [p.stat().st_mtime_ns for p in summaries]
    assert main(["sweep", str(recipe), "--output_dir", str(whole / "runs"), "--results_dir", str(whole)]) == 0
    assert [p.stat().st_mtime_ns for p in summaries] == stamps  # nothing ran twice
    assert (whole / "tiny.md").is_file() and (whole / "tiny.tex").is_file() and (whole / "tiny_reproduction.md").is_file()
    assert list(whole.glob("tiny*_acc_epoch*.png"))

    # the same sweep, killed mid-run (SIGKILL in its second run, mid-epoch), then resumed
    cmd = [
        sys.executable,
        "-c",
        KILLED_AFTER,
        "sweep",
        str(recipe),
        "--output_dir",
        str(parts / "runs"),
        "--results_dir",
        str(parts),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "KILL_AFTER": "30"}, capture_output=True, timeout=300)
    assert done.returncode != 0
    assert len(list((parts / "runs").glob("*/summary.json"))) < 4
    capsys.readouterr()
    assert main(cmd[3:]) == 0
    assert len(list((parts / "runs").glob("*/summary.json"))) == 4
    pd.testing.assert_frame_equal(table_without_timing(whole / "tiny.csv"), table_without_timing(parts / "tiny.csv"))


def test_print_commands_lists_pending_runs(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main(["sweep", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("accelerate launch launch.py --recipe") for line in lines)
    # seed by seed: a slow spell of the machine falls on one seed of several optimizers, not on all of one's
    assert [re.search(r"optimizer=(\w+) --set seed=(\d)", line).groups() for line in lines] == [
        ("sgd", "0"),
        ("sam", "0"),
        ("sgd", "1"),
        ("sam", "1"),
    ]
    assert "--set optimizer=sam --set seed=1" in lines[-1] and "--resume auto" in lines[-1]
    # each command runs exactly its configuration
    argv = lines[-1].split()[3:]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["sweep", str(recipe), "--output_dir", str(tmp_path / "runs"), "--print_commands"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    # tables from the one run done, naming the three missing, and nothing trained
    assert (
        main(["sweep", str(recipe), "--output_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path), "--tables_only"]) == 0
    )
    assert len(list((tmp_path / "runs").glob("*/summary.json"))) == 1
    assert "Partial: 1 of 4 runs done; not run: " in (tmp_path / "tiny.md").read_text()
    assert len(pd.read_csv(tmp_path / "tiny.csv")) == 1


def test_a_run_made_under_another_default_is_refused_not_reused(tmp_path, capsys):
    """A run's id holds only the settings it was given; config.json records what the variant resolved
    them to, so a run from before a default changed is named, never counted as the new default."""
    recipe = tiny_recipe(tmp_path)
    runs = tmp_path / "runs"
    argv = [
        "--recipe",
        str(recipe),
        "--set",
        "optimizer=looksam",
        "--set",
        "seed=0",
        "--set",
        "max_steps=2",
        "--output_dir",
        str(runs),
        "--resume",
        "auto",
    ]
    assert main(argv) == 0
    (config_file,) = runs.glob("*looksam*/config.json")
    recorded = read_json(config_file)["resolved_hyperparameters"]
    assert recorded["alpha"] == 0.03 and recorded["k"] == 5  # the defaults, recorded
    assert main(argv) == 0  # the same settings: reused
    config_file.write_text(config_file.read_text().replace('"alpha": 0.03', '"alpha": 0.7'))  # as an older version wrote it
    capsys.readouterr()
    assert main(argv) == 2
    assert "was run with alpha=0.7, which this version resolves to alpha=0.03 (a changed default)" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                str(recipe),
                "--set",
                'optimizer=["looksam"]',
                "--set",
                "seed=[0]",
                "--set",
                "max_steps=2",
                "--output_dir",
                str(runs),
                "--print_commands",
            ]
        )
        == 2
    )
    assert "alpha=0.7, which this version resolves to alpha=0.03" in capsys.readouterr().err


def test_reproduction_table_statuses(tmp_path):
    recipe_path = tiny_recipe(tmp_path)
    recipe = load_recipe(str(recipe_path))
    not_run = reproduction_table([recipe], None)
    assert set(not_run.status) == {"not run"} and "python launch.py sweep" in not_run.command[0]
    assert main(["sweep", str(recipe_path), "--output_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path)]) == 0
    table = reproduction_table([recipe], load_runs([tmp_path / "runs"])).set_index("optimizer")
    # two seeds: an interval of 12.7 standard errors, far wider than the default tolerance of 0.5 points
    assert table.loc["sam", "status"] == "not resolved" and table.loc["sam", "n"] == 2
    assert table.loc["sam", "tolerance"] == "±0.5" and table.loc["sam", "difference [95% CI]"].count("[") == 1


def test_label_noise_is_symmetric_seeded_and_recorded(tmp_path):
    data = ImageDataset(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), torch.arange(1000) % 10, 10, (0.5,), (0.5,), "x")
    noisy, changed = with_label_noise(data, 0.4, seed=3)
    assert len(changed) == 400
    assert (noisy.labels[changed] != data.labels[changed]).all()
    unchanged = torch.ones(1000, dtype=torch.bool)
    unchanged[changed] = False
    assert torch.equal(noisy.labels[unchanged], data.labels[unchanged])
    assert torch.equal(with_label_noise(data, 0.4, seed=3)[1], changed)
    assert not torch.equal(with_label_noise(data, 0.4, seed=4)[1], changed)
    assert (
        main(
            [
                "--arch_type",
                "mlp",
                "--epochs",
                "1",
                "--max_steps",
                "2",
                "--label_noise",
                "0.4",
                "--cpu",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    (run,) = list(tmp_path.iterdir())
    assert len(read_json(run / "label_noise.json")["changed"]) == round(0.4 * 1437)


def test_expected_calibration_error_by_hand():
    from accelerate import Accelerator

    from bench.loop.evaluation import evaluate

    # two classes; logits give confidence 0.9 on 10 samples (8 right) and 0.6 on 10 samples (3 right)
    logit = lambda p: torch.log(torch.tensor([p, 1 - p]))  # noqa: E731
    outputs = torch.stack([logit(0.9)] * 10 + [logit(0.6)] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2 + [0] * 3 + [1] * 7)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return outputs[: len(x)]

    data = ImageDataset(torch.zeros(20, 1, 1, 1, dtype=torch.uint8), labels, 2, (0.0,), (1.0,), "x")
    result = evaluate(Fixed(), data, data.images, labels, Accelerator(cpu=True))
    assert result["test_acc"] == pytest.approx(11 / 20)
    assert result["test_ece"] == pytest.approx((10 * abs(0.8 - 0.9) + 10 * abs(0.3 - 0.6)) / 20, abs=1e-6)


def test_an_optimizer_is_its_registered_name_wherever_a_recipe_names_it(tmp_path):
    """``--set optimizer=BSAM`` takes the recipe's [optimizers.bsam] settings, as ``bsam`` does."""
    recipe = load_recipe("digits")
    for spelled in ("bsam", "BSAM", "BayesianSAM"):
        (config,) = recipe.runs([f"optimizer={spelled}", "seed=0"])
        assert (config.optimizer, config.lr) == ("bsam", 0.5)
    (config,) = recipe.runs(["optimizer=GSAM", "seed=0"])
    assert config.hyperparameters.get("rho_min") == recipe.optimizers["gsam"]["rho_min"]
    child = tmp_path / "child.toml"  # a child's [optimizers.GSAM] merges into its parent's [optimizers.gsam]
    child.write_text('extends = "digits"\ndescription = "x"\n[optimizers.GSAM]\nrho = 0.1\n')
    assert load_recipe(str(child)).optimizers["gsam"] == {**recipe.optimizers["gsam"], "rho": 0.1}


def test_suite_hands_its_sweep_the_flags_a_sweep_takes():
    from bench.cli.flags import run_parser
    from bench.cli.run import suite_argv
    from bench.config import ConfigError

    argv = ["--suite", "digits", "--set", "seed=0", "--output_dir", "o", "--cpu"]
    assert suite_argv(argv, run_parser().parse_args(argv)) == ["digits", "--set=seed=0", "--output_dir", "o", "--cpu"]
    argv = ["--suite", "digits", "--epochs", "10"]  # the default value, written: refused too
    with pytest.raises(ConfigError, match="^--suite digits runs the recipe's sweep, .* got --epochs "):
        suite_argv(argv, run_parser().parse_args(argv))


def test_a_recipe_gives_each_run_once_names_none_and_extends_beside_itself(tmp_path, monkeypatch):
    """Runs that compute the same (a seed repeated, an [optimizers] setting over a grid axis, an equal-passes run
    that is also a grid point) are one run, never two jobs in one folder; run_name, one folder for every run, is
    refused; a relative ``extends`` is the file beside the recipe, whatever the working directory."""
    (tmp_path / "tiny.toml").write_text(TINY + "[equal_passes]\nsgd = 2\n")
    recipe = load_recipe(str(tmp_path / "tiny.toml"))
    assert len(recipe.runs(["seed=[0,0]"])) == 3  # sgd 2 and 4 epochs, sam
    runs = recipe.runs(["seed=[0]", "epochs=[2,4]", "optimizer=['sgd']"])
    assert sorted(r.epochs for r in runs) == [2, 4, 8]  # 2, 4 (a grid point and 2's equal passes), 8
    assert len({r.run_id() for r in runs}) == len(runs)
    with pytest.raises(ConfigError, match="run_name names one run; a recipe's runs are named by their ids"):
        recipe.runs(["run_name=x"])
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "base.toml").write_text(TINY.replace("lr = 0.05", "lr = 0.3"))
    (tmp_path / "studies" / "child.toml").write_text('name = "child"\nextends = "base.toml"\ndescription = "x"\n')
    (tmp_path / "base.toml").write_text(TINY.replace("lr = 0.05", "lr = 0.001"))  # in the working directory
    monkeypatch.chdir(tmp_path)
    assert load_recipe(str(tmp_path / "studies" / "child.toml")).config["lr"] == 0.3
