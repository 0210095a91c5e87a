"""The subcommands that train many runs: sweep and tune (then their tables), and sharpness."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pandas as pd

from bench.cli.reports import comparison
from bench.config import ConfigError
from bench.io import check_writable, write_text
from bench.loop.sharpness import measure_run_sharpness
from bench.progress import progress as make_progress
from bench.report import records
from bench.report.overwrite import check_reproduction_kept
from bench.report.plots import write_plots
from bench.report.reproduction import reproduction_table
from bench.report.runs import find_runs, load_runs, runs_frame
from bench.report.tables import frame_to_markdown, print_table
from bench.studies.launchers import Launcher, launcher_from, parse_sbatch, submit
from bench.studies.recipes import load_recipe
from bench.studies.recorded import Recorded
from bench.studies.sweep import commands, execution_order, run_argv, run_sweep
from bench.studies.sweep import status as sweep_status
from bench.studies.tune import final_configs, pending_commands, plan, replay, run_tuning
from bench.studies.tuning_tables import recorded_score, trial_records, write_tuning_results
from bench.usage import Parser

# -- the other commands ----------------------------------------------------------------------------


def recipe_parser(command: str, description: str, recipe_help: str, output_help: str, print_help: str) -> Parser:
    """The arguments of the commands that run a recipe's runs (sweep, tune)."""
    p = Parser(prog=f"launch.py {command}", description=description)
    p.add_argument("recipe", help=recipe_help)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--output_dir", default=None, help=output_help)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--results_dir", default="results")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--print_commands", action="store_true", help=print_help)
    p.add_argument(
        "--force", action="store_true", help="write the tables even if they leave out runs that RESULTS_DIR's per-run file lists"
    )
    p.add_argument(
        "--launcher",
        default="inline",
        help="inline: one run at a time in this process; local: jobs on this machine, side by side; slurm: "
        'jobs on a SLURM cluster (local and slurm need submitit: pip install -e ".[cluster]")',
    )
    p.add_argument(
        "--max_parallel", type=int, default=None, help="local: runs side by side (default: one per core); slurm: jobs at once"
    )
    later = "--tables_only collects the runs later" if command == "sweep" else "the same command again goes on from the runs done"
    p.add_argument("--no_wait", action="store_true", help=f"slurm: submit and return ({later})")
    p.add_argument(
        "--resubmit", action="store_true", help="slurm: submit again the runs not done whose job.json names an earlier job"
    )
    p.add_argument("--partition", default=None, help="slurm partition")
    p.add_argument("--account", default=None, help="slurm account")
    p.add_argument(
        "--time_min", type=int, default=None, help="each job's time limit in minutes (default: 240 on SLURM, a week locally)"
    )
    p.add_argument("--gpus_per_run", type=int, default=None, help="GPUs per run (more than 1: accelerate launch in its job)")
    p.add_argument("--nodes_per_run", type=int, default=None, help="slurm: nodes per run (accelerate launch across them)")
    p.add_argument("--cpus_per_run", type=int, default=None, help="slurm: CPUs per run")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="slurm: an extra sbatch option")
    if command == "tune":
        p.add_argument(
            "--tuning_seed",
            type=int,
            default=0,
            help="another whole tuning (trial seeds + 1000 x N, split_seed + N); its tables (RECIPE_tuning_seedN.md, ...) "
            "set its choices beside tuning seed 0's",
        )
    if command == "sweep":
        p.add_argument(
            "--tables_only",
            action="store_true",
            help="train nothing: write the tables and plots from the runs already done (the tables name the missing ones)",
        )
    p.add_argument(
        "--from_records",
        action="store_true",
        help="train nothing: rewrite the tables from the per-run files in RESULTS_DIR alone (sweep: RECIPE_runs.csv; tune: "
        "RECIPE_tuning_runs.csv and RECIPE_tuned_runs.csv); no run folders needed; the plots, which need them, are left as they are",
    )
    return p


def shown_command(command: str, argv: list[str]) -> str:
    """The command a table names at its top: the same whether trained now, read from the run folders or from
    the per-run files, and wherever written (the folder it sits in says that)."""
    shown = [a for a in argv if a not in ("--from_records", "--tables_only", "--force") and not a.startswith("--results_dir=")]
    if "--results_dir" in shown:
        at = shown.index("--results_dir")
        del shown[at : at + 2]
    return (
        "python launch.py" if command == "sweep" and shown == ["digits"] else f"python launch.py {command} " + shlex.join(shown)
    )


def cmd_sweep(argv: list[str]) -> int:
    p = recipe_parser(
        "sweep",
        "Run every configuration of a recipe, then write its tables.",
        "recipe name or .toml path",
        "default: runs/<recipe>",
        "print one command per pending run instead of running",
    )
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    extra = [f"{k}={v}" for k, v in (("data_dir", args.data_dir), ("cpu", "true" if args.cpu else None)) if v]
    configs = recipe.runs([*args.sets, *extra], output_dir=args.output_dir or f"runs/{recipe.name}")
    launcher = launcher_of(args, recipe, configs[0].output_dir)
    if args.print_commands:
        print("\n".join(commands(recipe, args.sets, configs)))
        return 0
    missing = []
    if launcher.kind != "inline" and not (args.from_records or args.tables_only):
        pending = [c for c in execution_order(configs) if sweep_status(c) != "done"]
        with make_progress() as progress:
            failed = submit(launcher, pending, lambda c: run_argv(recipe, job_sets(args), c), f"sweep {recipe.name}", progress)
        for line in failed:
            print(f"warning: {line}", file=sys.stderr)
        if not launcher.wait:
            return 0
        args.tables_only = True  # the tables from what is done; the missing runs are named
    else:
        failed = []
    if args.from_records:
        run_dirs, missing = recorded_runs(Path(args.results_dir), recipe.name, configs)
    elif args.tables_only:
        missing = [c.run_dir().name for c in configs if sweep_status(c) != "done"]
        run_dirs = [c.run_dir() for c in configs if sweep_status(c) == "done"]
        if not run_dirs:
            raise ConfigError(f"sweep {recipe.name} --tables_only: none of its {len(configs)} runs is done")
    else:
        with make_progress() as progress:
            run_dirs = run_sweep(recipe, configs, progress)
    command = shown_command("sweep", argv)
    others = [] if args.from_records else left_out(Path(configs[0].output_dir), configs)
    write_sweep_results(recipe, run_dirs, Path(args.results_dir), command, missing, others, args.force, [*args.sets, *extra])
    return 1 if failed else 0  # the tables hold what is done; a failed run is a failed sweep


def job_sets(args) -> list[str]:
    """The ``--set`` overrides a launched run repeats (its data folder is spelled by run_argv)."""
    return [*args.sets, *(["cpu=true"] if args.cpu else [])]


def launcher_of(args, recipe, output_dir: str) -> Launcher:
    """The checked launcher: the flags over the recipe's [launcher] section; its job logs under the output folder."""
    given = dict(
        kind=args.launcher,
        max_parallel=args.max_parallel,
        partition=args.partition,
        account=args.account,
        time_min=args.time_min,
        gpus_per_run=args.gpus_per_run,
        nodes_per_run=args.nodes_per_run,
        cpus_per_run=args.cpus_per_run,
        sbatch=parse_sbatch(args.sbatch),
        wait=not args.no_wait,
        resubmit=args.resubmit,
    )
    launcher = launcher_from(given, recipe.launcher, f"recipe {recipe.path}")
    launcher.folder = Path(output_dir) / "_jobs"
    return launcher


def left_out(output_dir: Path, configs) -> list[str]:
    """Finished runs in the sweep's folder that are not among its runs (another grid, another --set)."""
    mine = {c.run_dir().name for c in configs}
    return (
        sorted(p.parent.name for p in output_dir.glob("*/summary.json") if p.parent.name not in mine)
        if output_dir.is_dir()
        else []
    )


def recorded_runs(results_dir: Path, name: str, configs) -> tuple[pd.DataFrame, list[str]]:
    """The finished runs of ``configs`` in the per-run file of table ``name``, and the names of those not there."""
    recorded = Recorded(records.path_for(results_dir / name))
    matched = [(config, recorded.find(config)) for config in configs]
    mine = [record for _, record in matched if record is not None]
    if not mine:
        raise ConfigError(f"{name} --from_records: {recorded.path} holds none of its {len(configs)} runs")
    return runs_frame(mine, [str(recorded.path)] * len(mine)), [c.run_dir().name for c, record in matched if record is None]


def write_sweep_results(
    recipe,
    runs,
    results_dir: Path,
    command: str,
    missing: list[str] = (),
    others: list[str] = (),
    force: bool = False,
    sets: list[str] = (),
) -> None:
    """The recipe's tables and plots from its finished runs (their folders, or a frame of per-run records);
    ``missing`` names its runs not done, ``others`` the finished runs beside them that the table leaves out."""
    check_writable(results_dir / f"{recipe.name}.md")
    done = len(runs)
    preamble = (
        f"# {recipe.name}\n\n{recipe.description.strip()}\n\nGenerated by `{command}` from the run files "
        f"(`python launch.py sweep {recipe.name} --from_records` rebuilds the tables from `{recipe.name}_runs.csv` alone).\n\n"
    )
    if missing:
        preamble += f"Partial: {done} of {done + len(missing)} runs done; not run: {', '.join(missing)}.\n\n"
    if others:
        preamble += f"Left out: {len(others)} finished run(s) in the same folder, not of this grid: {', '.join(others)}.\n\n"
    reproduction = None
    if recipe.reported:  # checked before anything is written
        reproduction = reproduction_table([recipe], runs if isinstance(runs, pd.DataFrame) else load_runs(runs), sets)
        check_reproduction_kept(results_dir / f"{recipe.name}_reproduction.md", reproduction, force)
    table = comparison(runs, results_dir / recipe.name, preamble, force=force)
    plots = [] if isinstance(runs, pd.DataFrame) else write_plots(runs, results_dir / recipe.name)
    if reproduction is not None:
        write_text(results_dir / f"{recipe.name}_reproduction.md", preamble + frame_to_markdown(reproduction))
    print_table(table, title=str(results_dir / f"{recipe.name}.md"))
    for plot in plots:
        print(f"wrote {plot}")


def cmd_tune(argv: list[str]) -> int:
    p = recipe_parser(
        "tune",
        "Tune every optimizer of a recipe's [tune] section on a validation split with an equal "
        "budget, then run the chosen values on the full training set and write their tables.",
        "recipe name or .toml path (with a [tune] section)",
        "default: runs/<recipe>_tune (trials/ and final/ inside)",
        "print one command per pending trial (once they are done: per pending final run) instead of running",
    )
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    extra = [f"{k}={v}" for k, v in (("data_dir", args.data_dir), ("cpu", "true" if args.cpu else None)) if v]
    output_dir = args.output_dir or f"runs/{recipe.name}_tune"
    if args.tuning_seed < 0:
        raise ConfigError(f"--tuning_seed must be >= 0, got {args.tuning_seed}")
    tuning = plan(recipe, [*args.sets, *extra], output_dir, args.tuning_seed)
    results_dir = Path(args.results_dir)
    if args.from_records:  # the choice replayed from the trials' records, the tables from the records alone
        find = Recorded(records.path_for(results_dir / f"{recipe.name}_tuning{tuning.suffix}")).find
        chosen = replay(tuning, recorded_score(find))
        finals = [c for cs in final_configs(tuning, chosen).values() for c in cs]
        finals, _ = recorded_runs(results_dir, f"{recipe.name}_tuned{tuning.suffix}", finals)
        first = first_choices(recipe, [*args.sets, *extra], output_dir, tuning, results_dir, from_records=True)
        write_tuning_results(tuning, chosen, finals, results_dir, shown_command("tune", argv), args.force, find, first)
        return 0
    launcher = launcher_of(args, recipe, output_dir)
    if args.print_commands:
        print("\n".join(pending_commands(tuning, args.sets)))
        return 0
    launch = None
    if launcher.kind != "inline":

        def launch(configs, label):
            for line in submit(launcher, configs, lambda c: run_argv(recipe, job_sets(args), c), label, progress):
                progress.print(f"warning: {line}")

    with make_progress() as progress:
        outcome = run_tuning(tuning, progress, launch)
    if outcome is None:
        print(f"tune {recipe.name}: not every run of this stage is done; run the same command again to go on")
        return 0 if not launcher.wait else 1
    chosen, final_dirs = outcome
    first = first_choices(recipe, [*args.sets, *extra], output_dir, tuning, results_dir, from_records=False)
    command = shown_command("tune", argv)
    table = write_tuning_results(tuning, chosen, final_dirs, results_dir, command, force=args.force, first=first)
    name = f"{recipe.name}_tuned{tuning.suffix}"
    print_table(table, title=str(results_dir / f"{name}.md"))
    for written in [results_dir / f"{recipe.name}_tuning{tuning.suffix}.md", *write_plots(final_dirs, results_dir / name)]:
        print(f"wrote {written}")
    return 0


def first_choices(recipe, sets, output_dir, tuning, results_dir: Path, from_records: bool):
    """For a tuning seed other than 0: tuning seed 0's choices, from its trials' run folders or per-run file, or
    None where not all of its trials are there."""
    if not tuning.tuning_seed:
        return None
    first = plan(recipe, sets, output_dir)
    if from_records:
        path = records.path_for(results_dir / f"{recipe.name}_tuning")
        find = Recorded(path).find if path.is_file() else (lambda config: None)
    else:
        find = trial_records()
    if any(find(config) is None for config in first.trials()):
        return None
    chosen = replay(first, recorded_score(find))
    # the replay adds the extension rounds' trials: all of them done too, or seed 0's choice is not made yet
    return None if any(find(config) is None for config in first.trials()) else chosen


def cmd_sharpness(argv: list[str]) -> int:
    p = Parser(prog="launch.py sharpness", description="Measure the sharpness of finished runs (writes sharpness.json).")
    p.add_argument("runs", nargs="+")
    p.add_argument(
        "--samples", type=int, default=None, help="training images to measure on (default: the run's sharpness_samples)"
    )
    p.add_argument("--missing_only", action="store_true", help="skip runs that already have sharpness.json")
    args = p.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be an integer >= 1, got {args.samples}")
    for run in find_runs(args.runs):
        if args.missing_only and (run / "sharpness.json").is_file():
            continue
        print(run, measure_run_sharpness(run, args.samples))
    return 0
