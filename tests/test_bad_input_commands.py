"""Every subcommand refuses bad input at its boundary: one ``error:`` line, exit code 2, nothing written.

One table of cases (training flags, recipes, resume, sweep, tune, table, reproduction, sharpness, perf,
claims, variants); each names the message it must show. A second table covers the commands that would
replace a written result with a smaller one: refused unless ``--force``, the file left as it was.
"""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from bench.cli.main import main

FAST = ["--arch", "mlp", "--epochs", "1", "--batch_size", "64", "--cpu", "--max_steps", "2", "--save_every_epochs", "0"]
RECIPE = """name = "tiny"
[config]
dataset = "digits"
arch = "mlp"
epochs = 1
cpu = true
[grid]
optimizer = ["sgd"]
seed = [0]
"""


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A finished SAM run (runs/sam), damaged copies of it, a plain file, and recipes with one flaw each."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main([*FAST, "--sam_type", "SAM", "--output_dir", str(root / "runs"), "--run_name", "sam"]) == 0
    run = root / "runs" / "sam"
    for name, damage in {
        "corrupt": lambda r: (r / "config.json").write_text("{"),
        "listcfg": lambda r: (r / "config.json").write_text("[1, 2]"),
        "unknowncfg": lambda r: (r / "config.json").write_text(json.dumps({"nope": 1})),
        "nomodel": lambda r: (r / "model.safetensors").unlink(),
        "badmodel": lambda r: (r / "model.safetensors").write_bytes(b"not safetensors"),
        "badsummary": lambda r: (r / "summary.json").write_text("{trunc"),
    }.items():
        shutil.copytree(run, root / "damaged" / name)
        damage(root / "damaged" / name)
    for copy in ("a", "b"):  # one run given twice
        shutil.copytree(run, root / "twice" / copy)
    assert main(["table", str(run), "--out", str(root / "records" / "good")]) == 0
    header, row = (root / "records" / "good_runs.csv").read_text().splitlines()
    cells = dict(zip(*csv.reader([header, row])))
    for name, change in {
        "status": {"status": "bogus"},
        "settings": {"settings": "[1,2]"},
        "accuracy": {"final_test_acc": "5.0"},
    }.items():
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([cells, {**cells, **change}.values()])
        (root / "records" / f"{name}_runs.csv").write_text(out.getvalue())
    (root / "records" / "dup_runs.csv").write_text(f"{header}\n{row}\n{row}\n")
    (root / "file").write_text("a plain file")
    (root / "empty").mkdir()
    recipes = {
        "scalar_grid": RECIPE.replace("seed = [0]", "seed = 3"),
        "empty_axis": RECIPE.replace("seed = [0]", "seed = []"),
        "reported_list": RECIPE + '[[reported]]\noptimizer = "sgd"\n',
        "reported_int": "reported = 5\n" + RECIPE,
        "no_source": RECIPE + '[reported.sgd]\naccuracy = 90.0\nmetric = "last"\n',
        "bad_metric": RECIPE + '[reported.sgd]\naccuracy = 90.0\nmetric = "mean"\nsource = "x"\n',
        "bad_accuracy": RECIPE + '[reported.sgd]\naccuracy = 900.0\nmetric = "last"\nsource = "x"\n',
        "reported_key": RECIPE + '[reported.sgd]\naccuracy = 90.0\nmetric = "last"\nsource = "x"\nacc = 1\n',
        "config_list": 'name = "x"\nconfig = [1]\n',
        "config_scalar": 'name = "x"\nconfig = 3\n',
        "optimizers_scalar": "optimizers = 1\n" + RECIPE,
        "name_path": RECIPE.replace('name = "tiny"', 'name = "../escape"'),
        "name_int": RECIPE.replace('name = "tiny"', "name = 3"),
        "unknown_section": RECIPE + "[extra]\nx = 1\n",
        "not_toml": "name = \n",
        "bad_field": RECIPE.replace('arch = "mlp"', 'arch = "mlp"\nepochs_ = 2'),
        "bad_value": RECIPE.replace("epochs = 1", "epochs = 0"),
        "no_tune": RECIPE,
        "optimizer_key": RECIPE + "[optimizers.sma]\nrho = 0.1\n",
        "optimizer_twice": RECIPE + "[optimizers.SAM]\nrho = 0.1\n[optimizers.sam]\nrho = 0.2\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.toml").write_text(text)
    (root / "not_utf8.toml").write_bytes(b'name = "\xff\xfe"\n')
    (root / "claims_bad.toml").write_text("[[claim]]\ntext = 3\n")
    return root


# (argv with {root} for the fixture's folder, the message the one line must hold)
CASES = {
    # training flags
    "epochs 0": ([*FAST, "--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    "batch_size 0": ([*FAST, "--batch_size", "0"], "batch_size must be an integer >= 1"),
    "unknown dataset": ([*FAST, "--dataset", "nope"], "unknown dataset 'nope'"),
    "unknown arch": ([*FAST, "--arch", "nope"], "unknown architecture 'nope'"),
    "unknown variant": ([*FAST, "--sam_type", "nope"], "unknown --sam_type 'nope'"),
    "unknown base": ([*FAST, "--optimizer", "nope"], "unknown --optimizer 'nope'"),
    "unknown schedule": ([*FAST, "--schedule", "nope"], "schedule"),
    "unknown precision": ([*FAST, "--mixed_precision", "fp8"], "mixed_precision"),
    "run_name path": ([*FAST, "--run_name", "../x"], "run_name must be a folder name, not a path"),
    "run_name nested": ([*FAST, "--run_name", "a/b"], "run_name must be a folder name, not a path"),
    "output_dir under a file": ([*FAST, "--output_dir", "{root}/file/runs"], "is not writable"),
    "run folder is a file": ([*FAST, "--output_dir", "{root}", "--run_name", "file"], "is a file, not a run folder"),
    "label_noise 1": ([*FAST, "--label_noise", "1"], "label_noise must be in [0, 1), got 1.0"),
    "rho negative": ([*FAST, "--sam_type", "SAM", "--rho", "-1"], "sam: rho must be >= 0, got -1.0"),
    "unknown flag": ([*FAST, "--nope", "1"], "unrecognized arguments: --nope"),
    "bad int": ([*FAST, "--epochs", "two"], "invalid int value: 'two'"),
    # resume
    "resume missing": (["--resume", "{root}/missing"], "no config.json there"),
    "resume corrupt config": (["--resume", "{root}/damaged/corrupt"], "config.json is not valid JSON"),
    "resume config a list": (["--resume", "{root}/damaged/listcfg"], "holds list, not a run's settings"),
    "resume unknown field": (["--resume", "{root}/damaged/unknowncfg"], "unknown config field(s) nope"),
    "resume other rho": (["--resume", "{root}/runs/sam", "--rho", "0.5"], "--rho (0.05 there, 0.5 given)"),
    "resume other variant": (["--resume", "{root}/runs/sam", "--sam_type", "ASAM"], "--sam_type ('sam' there, 'asam' given)"),
    "resume unused flag": (["--resume", "{root}/runs/sam", "--k", "3"], "--k (not used by sam)"),
    "resume damaged summary": (["--resume", "{root}/damaged/badsummary"], "summary.json cannot be read as a run's summary"),
    "suite and other flags": (["--suite", "digits", "--lr", "0.5"], "--suite digits runs the recipe's sweep, which takes --set"),
    # recipes (one run, and sweep)
    "recipe unknown": (["--recipe", "nope"], "unknown recipe 'nope'"),
    "recipe and flags": (["--recipe", "digits", "--lr", "0.5"], "with --recipe, change settings with --set"),
    "recipe many runs": (["--recipe", "digits"], "describes 72 runs; pick one with --set"),
    "sweep unknown": (["sweep", "nope"], "unknown recipe 'nope'"),
    "sweep scalar grid": (["sweep", "{root}/scalar_grid.toml"], "grid.seed must be a non-empty list of values, got 3"),
    "sweep empty axis": (["sweep", "{root}/empty_axis.toml"], "grid.seed must be a non-empty list of values, got []"),
    "sweep reported list": (["sweep", "{root}/reported_list.toml"], "reported must be a table"),
    "sweep reported int": (["sweep", "{root}/reported_int.toml"], "reported must be a table, got 5"),
    "sweep reported no source": (["sweep", "{root}/no_source.toml"], "reported.sgd: missing source"),
    "sweep reported metric": (["sweep", "{root}/bad_metric.toml"], "reported.sgd.metric must be 'last' or 'best'"),
    "sweep reported accuracy": (["sweep", "{root}/bad_accuracy.toml"], "reported.sgd.accuracy must be a number in [0, 100]"),
    "sweep reported key": (["sweep", "{root}/reported_key.toml"], "reported.sgd: unknown key(s) acc"),
    "sweep config list": (["sweep", "{root}/config_list.toml"], "config must be a table, got [1]"),
    "sweep config scalar": (["sweep", "{root}/config_scalar.toml"], "config must be a table, got 3"),
    "sweep optimizers scalar": (["sweep", "{root}/optimizers_scalar.toml"], "optimizers must be a table, got 1"),
    "sweep name path": (["sweep", "{root}/name_path.toml"], "name must be a folder name, not a path"),
    "sweep name int": (["sweep", "{root}/name_int.toml"], "name must be a string, got 3"),
    "sweep unknown section": (["sweep", "{root}/unknown_section.toml"], "unknown section(s) extra"),
    "sweep not utf8": (["sweep", "{root}/not_utf8.toml"], "not UTF-8 text"),
    "sweep not toml": (["sweep", "{root}/not_toml.toml"], "not_toml.toml: Invalid value"),
    "sweep bad field": (["sweep", "{root}/bad_field.toml"], "epochs_"),
    "sweep bad value": (["sweep", "{root}/bad_value.toml"], "epochs must be an integer >= 1, got 0"),
    "sweep set no value": (["sweep", "{root}/bad_value.toml", "--set", "epochs"], "--set expects key=value, got 'epochs'"),
    "sweep set bad": (["sweep", "digits", "--set", "lr=-1", "--print_commands"], "lr must be > 0, got -1"),
    "sweep tables_only none": (
        ["sweep", "digits", "--tables_only", "--output_dir", "{root}/empty"],
        "none of its 72 runs is done",
    ),
    "sweep from_records none": (["sweep", "digits", "--from_records", "--results_dir", "{root}/empty"], "unreadable"),
    "sweep results under a file": (
        ["sweep", "digits", "--tables_only", "--output_dir", "{root}/runs", "--results_dir", "{root}/file/x"],
        "none of its 72 runs is done",
    ),
    "sweep unknown optimizer key": (["sweep", "{root}/optimizer_key.toml"], "optimizers.sma: unknown optimizer 'sma'"),
    "sweep optimizer twice": (["sweep", "{root}/optimizer_twice.toml"], "optimizers names sam twice (as 'SAM' and 'sam')"),
    "sweep set empty axis": (["sweep", "digits", "--set", "seed=[]"], "--set seed=[]: a grid axis needs at least one value"),
    # tune
    "tune no section": (["tune", "{root}/no_tune.toml"], "[tune]"),
    "tune unknown": (["tune", "nope"], "unknown recipe 'nope'"),
    # table
    "table missing": (["table", "{root}/missing", "--out", "{root}/t"], "no such folder"),
    "table empty": (["table", "{root}/empty", "--out", "{root}/t"], "no runs under"),
    "table out under a file": (["table", "{root}/runs", "--out", "{root}/file/t"], "is a file, not a folder"),
    "table out a folder": (["table", "{root}/runs", "--out", "{root}/empty/"], "is a folder; give the tables' path"),
    "table run twice": (["table", "{root}/twice", "--out", "{root}/t"], "is given twice"),
    "table file twice": (
        ["table", "{root}/records/good_runs.csv", "{root}/records/good_runs.csv", "--out", "{root}/t"],
        "is given twice",
    ),
    "table run twice in a file": (["table", "{root}/records/dup_runs.csv", "--out", "{root}/t"], "line 3: run "),
    "table bad status": (["table", "{root}/records/status_runs.csv", "--out", "{root}/t"], "status: 'bogus' is not one of"),
    "table accuracy above 1": (
        ["table", "{root}/records/accuracy_runs.csv", "--out", "{root}/t"],
        "final_test_acc: 5.0 is not a fraction in [0, 1]",
    ),
    "claims settings a list": (
        ["claims", "d={root}/records/settings_runs.csv", "--out", "{root}/c.md"],
        "settings: expected a JSON object, got [1, 2]",
    ),
    # reproduction
    "reproduction missing": (["reproduction", "{root}/missing", "--out", "{root}/r.md"], "no such folder"),
    "reproduction no runs": (["reproduction", "{root}/empty", "--out", "{root}/r.md"], "no finished run"),
    "reproduction out under a file": (["reproduction", "{root}/runs", "--out", "{root}/file/r.md"], "is a file, not a folder"),
    "reproduction out a folder": (["reproduction", "{root}/runs", "--out", "{root}/empty"], "is a folder; give a file path"),
    # sharpness
    "sharpness missing": (["sharpness", "{root}/missing"], "no such folder"),
    "sharpness no runs": (["sharpness", "{root}/empty"], "no finished run"),
    "sharpness no model": (["sharpness", "{root}/damaged/nomodel"], "has no model.safetensors"),
    "sharpness bad model": (["sharpness", "{root}/damaged/badmodel"], "cannot be loaded into mlp"),
    "sharpness corrupt config": (["sharpness", "{root}/damaged/corrupt"], "config.json is not valid JSON"),
    "sharpness samples 0": (["sharpness", "{root}/runs/sam", "--samples", "0"], "--samples must be an integer >= 1"),
    # perf
    "perf unknown optimizer": (["perf", "--optimizers", "nope"], "unknown optimizer 'nope'"),
    "perf unknown arch": (["perf", "--arch", "nope"], "unknown architecture 'nope'"),
    "perf steps 0": (["perf", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    "perf rounds 0": (["perf", "--rounds", "0"], "--rounds must be an integer >= 1, got 0"),
    "perf warmup -1": (["perf", "--warmup", "-1"], "--warmup must be an integer >= 0"),
    "perf batch -1": (["perf", "--batch_size", "-1"], "--batch_size must be an integer >= 1, got -1"),
    "perf image 0": (["perf", "--image_size", "0"], "--image_size must be an integer >= 1"),
    "perf no such device": (["perf", "--device", "cuda:7"], "no such device on this machine"),
    "perf not a device": (["perf", "--device", "gpu"], "is not a device"),
    "perf bad modes": (["perf", "--harness", "--modes", "eager,fast"], "--modes takes a comma-separated list"),
    "perf out under a file": (["perf", "--out", "{root}/file/p.md"], "is a file, not a folder"),
    "perf recipe and harness": (["perf", "--recipe", "digits", "--harness"], "not both"),
    "perf set without recipe": (["perf", "--set", "lr=1"], "--set and --data_dir apply to --recipe only"),
    # claims
    "claims no equals": (["claims", "digits", "--out", "{root}/c.md"], "expected NAME=RUNS, got 'digits'"),
    "claims missing runs": (["claims", "d={root}/missing", "--out", "{root}/c.md"], "no such folder"),
    "claims out under a file": (["claims", "d={root}/runs", "--out", "{root}/file/c.md"], "is a file, not a folder"),
    "claims file missing": (["claims", "d={root}/runs", "--claims", "{root}/missing.toml", "--out", "{root}/c.md"], "missing"),
    "claims file malformed": (["claims", "d={root}/runs", "--claims", "{root}/claims_bad.toml", "--out", "{root}/c.md"], "claim"),
    # variants
    "variants unknown flag": (["variants", "--nope"], "unrecognized arguments: --nope"),
}


def test_the_table_is_large_and_covers_every_subcommand():
    from bench.cli.main import COMMANDS

    assert len(CASES) >= 60
    first = {argv[0] for argv, _ in CASES.values()}
    assert set(COMMANDS) <= first and {"--resume", "--recipe", "--arch"} <= first


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_exit_2(case, place, capsys, monkeypatch):
    argv, message = CASES[case]
    monkeypatch.chdir(place)  # a default output folder (runs/, results/) lands in the fixture, not the repository
    before = _snapshot(place)
    capsys.readouterr()
    assert main([a.replace("{root}", str(place)) for a in argv]) == 2, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert _snapshot(place) == before, "a refused command wrote something"


# -- results are not replaced by smaller ones ------------------------------------------------------


def test_a_table_that_would_drop_runs_is_refused_unless_forced(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in ("0", "1"):
        assert main([*FAST, "--seed", seed, "--output_dir", str(runs)]) == 0
    assert main(["table", str(runs), "--out", str(tmp_path / "t")]) == 0
    kept = (tmp_path / "t_runs.csv").read_bytes()
    one = next(p for p in runs.iterdir() if "_s0_" in p.name)
    capsys.readouterr()
    assert main(["table", str(one), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "holds 1 finished run(s) the new table leaves out" in err and "--force" in err and err.count("\n") == 1
    assert (tmp_path / "t_runs.csv").read_bytes() == kept
    assert main(["table", str(one), "--out", str(tmp_path / "t"), "--force"]) == 0
    assert (tmp_path / "t_runs.csv").read_text().count("\n") == 2  # header and the one run


def test_a_sweep_of_one_seed_keeps_the_others_or_is_refused(tmp_path, capsys):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.replace("seed = [0]", "seed = [0, 1]").replace("epochs = 1", "epochs = 1\nmax_steps = 2"))
    out, results = ["--output_dir", str(tmp_path / "runs")], ["--results_dir", str(tmp_path / "results")]
    assert main(["sweep", str(recipe), *out, *results]) == 0
    table = tmp_path / "results" / "tiny.md"
    before = table.read_bytes()
    capsys.readouterr()
    assert main(["sweep", str(recipe), "--set", "seed=1", *out, *results]) == 2
    assert "leaves out (digits_mlp_sgd_s0_" in capsys.readouterr().err
    assert table.read_bytes() == before
    assert main(["sweep", str(recipe), "--set", "seed=1", *out, *results, "--force"]) == 0
    text = table.read_text()
    assert "Left out: 1 finished run(s) in the same folder, not of this grid: digits_mlp_sgd_s0_" in text


def test_claims_and_reproduction_never_replace_a_report_with_an_empty_one(tmp_path, capsys):
    claims, reproduction = tmp_path / "claims.md", tmp_path / "reproduction.md"
    claims.write_text("| a | b | +1.00 [+0.50, +1.50] paired | reproduced |\n")
    reproduction.write_text("| r | sgd | 90 | last | s | 90.00 ± 0.10 | 3 | +0.00 | within | python launch.py sweep r |\n")
    runs = tmp_path / "runs"
    assert main([*FAST, "--output_dir", str(runs)]) == 0
    capsys.readouterr()
    assert main(["claims", f"one={runs}", "--out", str(claims)]) == 2
    assert "holds 1 compared claims, the new one 0" in capsys.readouterr().err
    assert main(["reproduction", str(runs), "--out", str(reproduction)]) == 2
    assert "holds 1 measured rows, the new one 0" in capsys.readouterr().err
    assert claims.read_text().startswith("| a |") and reproduction.read_text().startswith("| r |")
    assert main(["claims", f"one={runs}", "--out", str(claims), "--force"]) == 0
    assert "No claim has both" in claims.read_text()


def test_perf_never_replaces_a_longer_table_unless_forced(tmp_path, capsys):
    out = tmp_path / "perf.md"
    out.write_text("".join(f"| row {i} |\n" for i in range(6)))
    argv = ["perf", "--arch", "mlp", "--channels", "1", "--image_size", "8", "--steps", "1", "--rounds", "1"]
    argv += ["--warmup", "0", "--optimizers", "sam", "--no_external", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} holds 6 table lines, the new one 4" in err and "--force" in err and err.count("\n") == 1
    assert out.read_text().startswith("| row 0 |")
    assert main([*argv, "--force"]) == 0
    assert "| sam |" in out.read_text() and "--force" not in out.read_text()
