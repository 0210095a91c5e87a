"""Command line: ``python launch.py`` (or ``sam-bench``).

    python launch.py                         the default suite: ``sweep digits``
    python launch.py --suite NAME            the same as ``sweep NAME``
    python launch.py sweep RECIPE [--set k=v] every run of a recipe (resumable), then its tables and plots
    python launch.py --recipe RECIPE [--set k=v]   one run of a recipe
    python launch.py [run flags]             one run (the seed project's flags work verbatim)
    python launch.py table [RUN_DIRS...]     aggregate finished runs into a results table
    python launch.py reproduction            reported against measured, for every recipe
    python launch.py sharpness RUN_DIRS...   measure the sharpness of finished runs
    python launch.py perf                    time one training step of every optimizer
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig

#: For each variant, the seed project's flags it uses and the hyperparameter each sets.
VARIANT_FLAGS: dict[str, dict[str, str]] = {
    "sam": {"rho": "rho"},
    "adaptive_sam": {"rho": "rho"},
    "asam": {"rho": "rho", "eta": "eta"},
    "esam": {"rho": "rho", "beta": "beta", "gamma": "gamma"},
    "gsam": {"rho": "rho", "rho_max": "rho", "rho_min": "rho_min", "gsam_alpha": "alpha", "adaptive": "adaptive"},
    "fisher_sam": {"rho": "rho", "eta": "eta"},
    "bsam": {"rho": "rho", "msharpness": "msharpness", "gamma": "damping", "delta": "prior_precision"},
    "friendly_sam": {"rho": "rho", "sigma": "sigma", "lmbda": "lmbda", "adaptive": "adaptive"},
    "looksam": {"rho": "rho", "k": "k", "alpha": "alpha"},
    "look_layer_sam": {"rho": "rho", "k": "k", "alpha": "alpha"},
}
ALL_VARIANT_FLAGS = sorted({flag for flags in VARIANT_FLAGS.values() for flag in flags} | {"adaptive"})


class UsageError(Exception):
    """Reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch.py", description="Train one model with SGD/AdamW or a SAM variant.")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data_dir", default=None, help="where cifar10/cifar100/tinyimagenet files are (or go)")
    p.add_argument("--arch_type", "--arch", dest="arch", default="smallcnn")
    p.add_argument("--optimizer", default="sgd", help="base optimizer: sgd, adamw or adam")
    p.add_argument("--sam_type", default=None, help="SAM variant (case-insensitive); omit for the plain base optimizer")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--schedule", default="cosine", help="cosine, step (x0.2 at 30/60/80%%) or constant")
    p.add_argument("--warmup_epochs", type=float, default=0.0)
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument("--cutout", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", default="no", help="no, bf16 or fp16")
    p.add_argument("--sam_sync", default="local", help="local (per-replica perturbation) or global")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per pass (batch_size is the whole batch)")
    p.add_argument("--max_consecutive_skips", type=int, default=20, help="stop after this many non-finite steps in a row")
    p.add_argument("--save_every_steps", type=int, default=0, help="checkpoint every N steps (0: off)")
    p.add_argument("--save_every_epochs", type=int, default=1, help="checkpoint every N epochs (0: off); always at the end")
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--resume", default=None, help="'auto' (this config's run directory, if it has a checkpoint) or a run directory")
    p.add_argument("--log_with", default=None, help="an Accelerate tracker: tensorboard, wandb, mlflow, ...")
    p.add_argument("--train_subset", type=int, default=None, help="train on a fixed subset of this many images")
    p.add_argument("--label_noise", type=float, default=0.0, help="fraction of training labels replaced at random")
    p.add_argument("--sharpness", action="store_true", help="measure the final model's sharpness (sharpness.json)")
    p.add_argument("--recipe", default=None, help="a recipe name or .toml path (see bench/recipes/); change it with --set")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field")
    p.add_argument("--suite", default=None, help="run a recipe's whole grid (like `sweep NAME`)")
    p.add_argument("--output_dir", default="runs")
    p.add_argument("--run_name", default=None)
    variant = p.add_argument_group("variant hyperparameters (unset: the variant's paper default)")
    variant.add_argument("--rho", type=float)
    variant.add_argument("--adaptive", action="store_true", default=None)
    variant.add_argument("--eta", type=float)
    variant.add_argument("--beta", type=float)
    variant.add_argument("--gamma", type=float, help="ESAM: data fraction; bSAM: damping")
    variant.add_argument("--msharpness", type=int)
    variant.add_argument("--delta", type=float, help="bSAM: prior precision")
    variant.add_argument("--sigma", type=float)
    variant.add_argument("--lmbda", type=float)
    variant.add_argument("--k", type=int)
    variant.add_argument("--alpha", type=float)
    variant.add_argument("--gsam_alpha", type=float)
    variant.add_argument("--rho_max", type=float)
    variant.add_argument("--rho_min", type=float)
    return p


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """Map the flags onto a RunConfig; notes report flags that do not apply and renamed semantics."""
    from optimizers.registry import canonical_name

    notes: list[str] = []
    given = {flag: getattr(args, flag) for flag in ALL_VARIANT_FLAGS if getattr(args, flag) is not None}
    sam_type = args.sam_type
    if args.optimizer.lower() not in ("sgd", "adamw", "adam"):
        raise ConfigError(f"unknown base optimizer {args.optimizer!r}; choose one of: sgd, adamw, adam")
    if sam_type is None or sam_type.lower() in ("none", "sgd", "adamw", "adam"):
        name = args.optimizer.lower()
    else:
        try:
            name = canonical_name(sam_type)
        except ValueError:
            variants = ", ".join(VARIANT_FLAGS)
            raise ConfigError(f"unknown --sam_type {sam_type!r}; choose one of: {variants} (case-insensitive)") from None
    if name == "sam" and given.get("adaptive"):
        name = "adaptive_sam"
        given.pop("adaptive")
        notes.append("--sam_type SAM --adaptive runs adaptive_sam (davda54-style, T_w = |w|); --sam_type ASAM is the official ASAM")
    used = VARIANT_FLAGS.get(name, {})
    hyperparameters: dict[str, Any] = {}
    for flag, value in given.items():
        if flag in used:
            hyperparameters[used[flag]] = value
        else:
            notes.append(f"--{flag} is not used by {name}; ignored")
    if name == "fisher_sam" and "rho" in given:
        notes.append("fisher_sam: --rho sets the paper's gamma (the radius of the Fisher ellipsoid)")
    if name == "bsam":
        if args.optimizer.lower() != "sgd":
            notes.append(f"--optimizer {args.optimizer} is not used by bsam (it has its own update rule)")
        if args.weight_decay:
            notes.append("--weight_decay is not used by bsam: its weight decay is prior_precision (--delta) / N")
        if given.get("delta") == 10:
            notes.append("bsam: --delta 10 is the paper's printed prior precision; the authors' code uses 40")
    config = RunConfig(
        dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, optimizer=name, base_optimizer=args.optimizer,
        hyperparameters=hyperparameters, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, cutout=args.cutout, seed=args.seed,
        mixed_precision=args.mixed_precision, sam_sync=args.sam_sync, cpu=args.cpu, max_steps=args.max_steps,
        grad_accum_steps=args.grad_accum_steps, max_consecutive_skips=args.max_consecutive_skips,
        save_every_steps=args.save_every_steps, save_every_epochs=args.save_every_epochs,
        keep_checkpoints=args.keep_checkpoints, output_dir=args.output_dir, run_name=args.run_name,
        train_subset=args.train_subset, log_with=args.log_with, label_noise=args.label_noise, sharpness=args.sharpness,
    )
    return config.validate(), notes


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()
    )


def resume_config(path: str) -> RunConfig:
    """The settings of the run in directory ``path`` (its config.json)."""
    from pathlib import Path

    from .io import read_json

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--resume {path}: no config.json there (expected a run directory, or 'auto')")
    saved = read_json(config_file)
    config = RunConfig.from_dict(saved, ignore=("run_id", "world_size", "device", "versions"))
    config.output_dir, config.run_name = str(Path(path).parent), Path(path).name
    return config.validate()


def cmd_run(argv: list[str]) -> int:
    from rich.console import Console

    from .train import train

    parser = run_parser()
    args = parser.parse_args(argv)
    if args.suite:
        return cmd_sweep([args.suite, *[f"--set={s}" for s in args.sets]])
    console = Console(stderr=True)
    if args.resume not in (None, "auto"):
        config, notes = resume_config(args.resume), [f"settings come from {args.resume}/config.json"]
    elif args.recipe:
        config, notes = recipe_config(parser, args), []
    else:
        config, notes = config_from_args(args)
    for note in notes:
        console.print(f"note: {note}")
    from accelerate import PartialState

    with _progress() as progress:
        result = train(config, progress=progress, resume=args.resume is not None)
    if not PartialState().is_main_process:
        return 0
    s = result.summary
    console.print(
        f"{result.run_dir}: test acc {s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f}), "
        f"{s['steps']} steps{' (stopped early at --max_steps)' if s['stopped_early'] else ''}, {s['wall_time_s']:.1f}s"
    )
    return 0


RECIPE_FLAGS = {"recipe", "sets", "output_dir", "data_dir", "resume", "cpu", "save_every_steps", "save_every_epochs",
                "keep_checkpoints", "log_with"}


def recipe_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunConfig:
    """The one run a recipe (with --set overrides) describes."""
    from .recipes import load_recipe

    stray = [f"--{k}" for k, v in vars(args).items() if k not in RECIPE_FLAGS and v != parser.get_default(k)]
    if stray:
        raise ConfigError(f"with --recipe, change settings with --set field=value (got {', '.join(stray)})")
    recipe = load_recipe(args.recipe)
    configs = recipe.runs(args.sets)
    if len(configs) != 1:
        raise ConfigError(
            f"recipe {recipe.name} describes {len(configs)} runs; pick one with --set (grid: {', '.join(recipe.grid)}) "
            f"or run them all with `launch.py sweep {recipe.name}`"
        )
    given = {k: v for k, v in vars(args).items() if k in RECIPE_FLAGS - {"recipe", "sets", "resume"} and v != parser.get_default(k)}
    return dataclasses.replace(configs[0], **given).validate()


def cmd_sweep(argv: list[str]) -> int:
    import shlex as _shlex

    from .recipes import load_recipe
    from .sweep import commands, run_sweep

    p = _Parser(prog="launch.py sweep", description="Run every configuration of a recipe, then write its tables.")
    p.add_argument("recipe", help="recipe name or .toml path")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--output_dir", default=None, help="default: runs/<recipe>")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--results_dir", default="results")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--print_commands", action="store_true", help="print one command per pending run instead of running")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    extra = [f"{k}={v}" for k, v in (("data_dir", args.data_dir), ("cpu", "true" if args.cpu else None)) if v]
    configs = recipe.runs([*args.sets, *extra], output_dir=args.output_dir or f"runs/{recipe.name}")
    if args.print_commands:
        print("\n".join(commands(recipe, args.sets, configs)))
        return 0
    with _progress() as progress:
        run_dirs = run_sweep(recipe, configs, progress)
    command = "python launch.py" if argv == ["digits"] else "python launch.py sweep " + _shlex.join(argv)
    write_sweep_results(recipe, run_dirs, Path(args.results_dir), command)
    return 0


def write_sweep_results(recipe, run_dirs, results_dir: Path, command: str) -> None:
    from .io import write_text
    from .plots import write_plots
    from .results import frame_to_markdown, load_runs, print_table, reproduction_table, write_comparison

    preamble = f"# {recipe.name}\n\n{recipe.description.strip()}\n\nGenerated by `{command}` from the run files.\n\n"
    table = write_comparison(run_dirs, results_dir / recipe.name, preamble)
    plots = write_plots(run_dirs, results_dir / recipe.name)
    if recipe.reported:
        reproduction = reproduction_table([recipe], load_runs(run_dirs))
        write_text(results_dir / f"{recipe.name}_reproduction.md", preamble + frame_to_markdown(reproduction))
    print_table(table, title=str(results_dir / f"{recipe.name}.md"))
    for plot in plots:
        print(f"wrote {plot}")


def cmd_reproduction(argv: list[str]) -> int:
    from .io import write_text
    from .recipes import available_recipes, load_recipe
    from .results import find_runs, frame_to_markdown, load_runs, reproduction_table

    p = _Parser(prog="launch.py reproduction", description="Reported against measured for every recipe with a reported number.")
    p.add_argument("runs", nargs="*", default=["runs"])
    p.add_argument("--out", default="results/reproduction.md")
    args = p.parse_args(argv)
    recipes = [r for r in map(load_recipe, available_recipes()) if r.reported]
    runs = load_runs(args.runs) if find_runs(args.runs) else None
    table = reproduction_table(recipes, runs)
    write_text(args.out, "# Reproduction\n\nGenerated by `python launch.py reproduction "
               + " ".join(args.runs) + "` from the recipes in bench/recipes and the run files.\n"
               "Status: within (|difference| <= max(reported spread, measured std)), below, above, or not run "
               "(full-scale recipes; the command runs them).\n\n" + frame_to_markdown(table))
    print(frame_to_markdown(table))
    return 0


def cmd_sharpness(argv: list[str]) -> int:
    from .results import find_runs
    from .train import measure_run_sharpness

    p = _Parser(prog="launch.py sharpness", description="Measure the sharpness of finished runs (writes sharpness.json).")
    p.add_argument("runs", nargs="+")
    p.add_argument("--samples", type=int, default=None, help="training images to measure on (default: the run's sharpness_samples)")
    p.add_argument("--missing_only", action="store_true", help="skip runs that already have sharpness.json")
    args = p.parse_args(argv)
    for run in find_runs(args.runs):
        if args.missing_only and (run / "sharpness.json").is_file():
            continue
        print(run, measure_run_sharpness(run, args.samples))
    return 0


def cmd_table(argv: list[str]) -> int:
    from .results import print_table, write_comparison

    p = _Parser(prog="launch.py table", description="Aggregate run directories into a comparison table.")
    p.add_argument("runs", nargs="*", default=["runs"], help="run directories, or folders holding them")
    p.add_argument("--out", default="results/table", help="path prefix for the .csv and .md files")
    args = p.parse_args(argv)
    table = write_comparison(args.runs, args.out)
    print_table(table, title=f"{args.out}.md")
    return 0


def cmd_perf(argv: list[str]) -> int:
    from .perf import main as perf_main

    return perf_main(argv)


COMMANDS = {"sweep": cmd_sweep, "table": cmd_table, "reproduction": cmd_reproduction, "sharpness": cmd_sharpness,
            "perf": cmd_perf}


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .train import CheckpointError, TrainingStopped

    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            return cmd_sweep(["digits"])
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return cmd_run(argv)
    except (ConfigError, DataError, UsageError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
