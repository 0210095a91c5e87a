"""Command line: ``python launch.py`` (or ``sam-bench``).

    python launch.py                         the default suite: ``sweep digits``
    python launch.py --suite NAME            the same as ``sweep NAME``
    python launch.py sweep RECIPE [--set k=v] every run of a recipe (resumable), then its tables and plots
    python launch.py tune RECIPE [--set k=v]  tune every optimizer on a validation split (equal budget), then run the choice
    python launch.py --recipe RECIPE [--set k=v]   one run of a recipe
    python launch.py [run flags]             one run (the seed project's flags work verbatim)
    python launch.py table [RUN_DIRS...]     aggregate finished runs into a results table
    python launch.py reproduction            reported against measured, for every recipe
    python launch.py sharpness RUN_DIRS...   measure the sharpness of finished runs
    python launch.py perf                    time one training step of every optimizer
    python launch.py claims NAME=RUNS ...    published claims (SAM beats SGD, ...) against finished runs
    python launch.py variants                every optimizer, its settings and their flags

The variant flags (``--rho``, ``--k``, ...) and their help are generated from the variants'
declared settings (``optimizers.settings.Setting``): a new variant's flags appear here
without a change to this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from accelerate import PartialState
from rich.console import Console

from optimizers import available_optimizers, optimizer_class
from optimizers.base import BASE_OPTIMIZERS
from optimizers.registry import canonical_name, variants_markdown

from .checkpoint import CheckpointError, checkpoints
from .claims import main as claims_main
from .config import RUN_METADATA, ConfigError, RunConfig
from .data import DataError
from .io import read_json, write_text
from .perf import main as perf_main
from .plots import write_plots
from .progress import progress as make_progress
from .recipes import available_recipes, load_recipe
from .results import (
    ResultsError,
    RunSkipped,
    find_runs,
    frame_to_markdown,
    load_runs,
    print_table,
    reproduction_table,
    write_comparison,
)
from .sharpness import measure_run_sharpness
from .sweep import commands, run_sweep
from .sweep import status as sweep_status
from .train import TrainingStopped, train
from .tune import pending_commands, plan, run_tuning, write_tuning_results
from .usage import Parser, UsageError

# -- variant flags, generated from the declarations ------------------------------------------------


def variant_settings() -> dict[str, dict[str, Any]]:
    """variant name -> {flag: Setting} for every registered variant."""
    table = {}
    for name in available_optimizers():
        settings = getattr(optimizer_class(name), "settings", ())
        table[name] = {flag: s for s in settings for flag in s.flags}
    return table


def _flag_type(settings: list) -> dict[str, Any]:
    kinds = {s.kind for s in settings}
    if kinds == {bool}:  # --adaptive sets true, --no-adaptive false; unset: the variant's default
        return {"action": argparse.BooleanOptionalAction, "default": None}
    return {"type": int if kinds == {int} else float}


def _flag_help(uses: list[tuple[str, Any]]) -> str:
    by_meaning: dict[tuple[str, str], list[str]] = defaultdict(list)
    for variant, s in uses:
        by_meaning[(s.symbol or s.name, s.help)].append(variant)
    return "; ".join(f"{', '.join(v)}: {name}" + (f" ({text})" if text else "") for (name, text), v in by_meaning.items())


def add_variant_flags(parser: argparse.ArgumentParser) -> None:
    uses: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for variant, flags in variant_settings().items():
        for flag, setting in flags.items():
            uses[flag].append((variant, setting))
    group = parser.add_argument_group("variant settings (unset: the variant's declared default; `launch.py variants` lists them)")
    for flag in sorted(uses):
        group.add_argument(f"--{flag}", help=_flag_help(uses[flag]).replace("%", "%%"),
                           **_flag_type([s for _, s in uses[flag]]))


def variant_flag_names() -> list[str]:
    return sorted({flag for flags in variant_settings().values() for flag in flags})


# -- the run command -------------------------------------------------------------------------------


def run_parser() -> argparse.ArgumentParser:
    p = Parser(prog="launch.py", description="Train one model with SGD/AdamW or a SAM variant.")
    p.add_argument("--dataset", default="digits", help="digits, cifar10, cifar100, tinyimagenet (in memory), imagefolder "
                   "(class folders under --data_dir) or hf:OWNER/NAME (a Hugging Face Hub dataset, streamed)")
    p.add_argument("--data_dir", default=None, help="where cifar10/cifar100/tinyimagenet files are (or go); "
                   "for imagefolder the folder holding train/<class>/ and val/<class>/")
    p.add_argument("--arch_type", "--arch", dest="arch", default="smallcnn")
    p.add_argument("--optimizer", default="sgd", help="base optimizer: sgd, adamw or adam")
    p.add_argument("--sam_type", default=None, help="SAM variant (case-insensitive); omit for the plain base optimizer")
    for name, kind, default, text in RUN_FLAGS:
        p.add_argument(f"--{name}", type=kind, default=default, help=text)
    for name, text in SWITCHES:
        p.add_argument(f"--{name}", action="store_true", help=text)
    p.add_argument("--resume", default=None, help="'auto' (this config's run directory, if it has a checkpoint) or a run directory")
    p.add_argument("--recipe", default=None, help="a recipe name or .toml path (see bench/recipes/); change it with --set")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field")
    p.add_argument("--suite", default=None, help="run a recipe's whole grid (like `sweep NAME`)")
    add_variant_flags(p)
    return p


#: (flag, type, default, help) of the run flags that map one to one onto RunConfig fields.
RUN_FLAGS = [
    ("epochs", int, 10, None), ("batch_size", int, 128, None), ("lr", float, 0.1, None),
    ("momentum", float, 0.9, None), ("weight_decay", float, 5e-4, None),
    ("schedule", str, "cosine", "cosine, step (x0.2 at 30/60/80%%) or constant"),
    ("warmup_epochs", float, 0.0, None), ("label_smoothing", float, 0.0, None), ("seed", int, 0, None),
    ("mixed_precision", str, "no", "no, bf16 or fp16"),
    ("sam_sync", str, "local", "local (per-replica perturbation) or global (all-reduced ascent gradient)"),
    ("max_steps", int, None, "stop after this many optimizer steps"),
    ("grad_accum_steps", int, 1, "micro-batches per pass (batch_size is the whole batch)"),
    ("max_consecutive_skips", int, 20, "stop after this many non-finite steps in a row"),
    ("save_every_steps", int, 0, "checkpoint every N steps (0: off)"),
    ("save_every_epochs", int, 1, "checkpoint every N epochs (0: off); always at the end"),
    ("keep_checkpoints", int, 2, None), ("log_with", str, None, "an Accelerate tracker: tensorboard, wandb, mlflow, ..."),
    ("train_subset", int, None, "train on a fixed subset of this many images"),
    ("label_noise", float, 0.0, "fraction of training labels replaced at random"),
    ("val_fraction", float, 0.0, "hold out this fraction of the training set (stratified) for validation"),
    ("split_seed", int, 0, "seed of the validation split (the same for every run seed)"),
    ("test_every_epochs", int, 1, "evaluate the test set every N epochs and after the last (the validation split: every epoch)"),
    ("threads", int, None, "torch threads per process (default: the cores divided among the processes)"),
    ("compile_backend", str, "inductor", "torch.compile backend used with --compile"),
    ("image_size", int, None, "imagefolder and hf: datasets: side of the training crop and the evaluation view (default 224)"),
    ("workers", int, None, "imagefolder and hf: datasets: decoding workers per process (0: in the training process; "
     "default: the free cores, at most 8)"),
    ("image_column", str, None, "hf: datasets: the image column (default: detected)"),
    ("label_column", str, None, "hf: datasets: the label column (default: detected)"),
    ("output_dir", str, "runs", None), ("run_name", str, None, None),
]
SWITCHES = [
    ("nesterov", None), ("cutout", None), ("cpu", "train on the CPU even when a GPU is present"),
    ("sharpness", "measure the final model's sharpness (sharpness.json)"),
    ("compile", "torch.compile the model (one graph serves every pass of every variant)"),
    ("channels_last", "channels-last memory format for the model and its input batches"),
    ("sync_bn", "BatchNorm statistics over all processes (with --sam_sync global: equals one process on the whole batch)"),
]


def _variant_name(args: argparse.Namespace) -> str:
    if args.optimizer.lower() not in BASE_OPTIMIZERS:
        raise ConfigError(f"unknown base optimizer {args.optimizer!r}; choose one of: {', '.join(BASE_OPTIMIZERS)}")
    if args.sam_type is None or args.sam_type.lower() in ("none", *BASE_OPTIMIZERS):
        return args.optimizer.lower()
    try:
        return canonical_name(args.sam_type)
    except ValueError:
        variants = ", ".join(n for n in available_optimizers() if n not in BASE_OPTIMIZERS)
        raise ConfigError(f"unknown --sam_type {args.sam_type!r}; choose one of: {variants} (case-insensitive)") from None


def variant_hyperparameters(name: str, given: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """Map the variant flags given onto ``name``'s settings; a boolean setting that selects another
    variant (the seed's ``--sam_type SAM --adaptive``) switches to it. Returns (name, settings, notes)."""
    notes: list[str] = []
    flags = variant_settings()[name]
    for flag, value in list(given.items()):
        selects = getattr(flags.get(flag), "selects", None)
        if selects and value is True:
            notes.append(f"--sam_type {name} --{flag} runs {selects}: {optimizer_class(selects).paper}")
            name, flags = selects, variant_settings()[selects]
            given.pop(flag)
    hyperparameters = {}
    for flag, value in given.items():
        if flag in flags:
            hyperparameters[flags[flag].name] = value
            if flags[flag].symbol:
                notes.append(f"{name}: --{flag} sets the paper's {flags[flag].symbol}")
        else:
            notes.append(f"--{flag} is not used by {name}; ignored")
    return name, hyperparameters, notes


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """Map the flags onto a RunConfig; notes report flags that do not apply and renamed semantics."""
    given = {flag: getattr(args, flag) for flag in variant_flag_names() if getattr(args, flag) is not None}
    name, hyperparameters, notes = variant_hyperparameters(_variant_name(args), given)
    cls = optimizer_class(name)
    if not getattr(cls, "uses_base_optimizer", True):
        declared = {s.name for s in getattr(cls, "settings", ())}
        unused = [f"--{f}" for f in ("optimizer", "momentum", "weight_decay", "nesterov") if f not in declared]
        notes.append(f"{name} has its own update rule: {', '.join(unused)} do not apply")
    fields = {name_: getattr(args, name_) for name_, *_ in RUN_FLAGS} | {name_: getattr(args, name_) for name_, _ in SWITCHES}
    config = RunConfig(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, optimizer=name,
                       base_optimizer=args.optimizer, hyperparameters=hyperparameters, **fields)
    return config.validate(), notes


def given_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags actually written on the command line."""
    parser = run_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resume_config(path: str, argv: list[str]) -> RunConfig:
    """The settings of the run in directory ``path``; flags that contradict them are refused."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--resume {path}: no config.json there (expected a run directory, or 'auto')")
    saved = RunConfig.from_dict(read_json(config_file), ignore=RUN_METADATA)
    saved.output_dir, saved.run_name = str(Path(path).parent), Path(path).name
    saved.validate()
    given = given_flags(argv) - {"resume", "output_dir", "run_name", "sets"}
    if given:
        asked, _ = config_from_args(run_parser().parse_args(argv))
        names = {"arch", "optimizer", "hyperparameters"} | {f.name for f in dataclasses.fields(RunConfig)}
        fields = {"optimizer" if g in ("sam_type",) else g for g in given} & names
        if given & set(variant_flag_names()):
            fields.add("hyperparameters")
        differ = [f"{f} ({getattr(saved, f)!r} there, {getattr(asked, f)!r} given)" for f in sorted(fields)
                  if getattr(saved, f) != getattr(asked, f)]
        if differ:
            raise ConfigError(f"--resume {path}: settings differ from its config.json: {'; '.join(differ)}; "
                              "drop them to resume, or start a new run")
    return saved


def cmd_run(argv: list[str]) -> int:
    parser = run_parser()
    args = parser.parse_args(argv)
    if args.suite:
        return cmd_sweep([args.suite, *[f"--set={s}" for s in args.sets]])
    console = Console(stderr=True, soft_wrap=True)  # a long line stays one line in a log
    if args.resume not in (None, "auto"):
        config, notes = resume_config(args.resume, argv), []
    elif args.recipe:
        config, notes = recipe_config(parser, args), []
    else:
        config, notes = config_from_args(args)
    if args.resume == "auto" and not checkpoints(config.run_dir()) and not (config.run_dir() / "summary.json").is_file():
        notes.append(f"--resume auto: no run with these settings in {config.output_dir} (id {config.run_id()}); starting a new one")
    # the launcher's RANK: the process group does not exist before train() starts Accelerate
    main_process = os.environ.get("RANK", "0") == "0"
    for note in notes if main_process else ():
        console.print(f"note: {note}")
    with make_progress() as progress:
        result = train(config, progress=progress, resume=args.resume is not None)
    if not PartialState().is_main_process:
        return 0
    for note in result.notes:
        console.print(f"note: {note}")
    s = result.summary
    if result.already_finished:
        console.print(f"{result.run_dir}: already finished ({s['status']}); nothing changed")
        return 0
    # an accuracy is None where its split was not evaluated (a diverged run; --test_every_epochs)
    scores = [f"{split} acc {s[f'final_{split}_acc']:.4f}" for split in ("val", "test") if s.get(f"final_{split}_acc") is not None]
    if s.get("best_test_acc") is not None:
        scores[-1] += f" (best {s['best_test_acc']:.4f})"
    console.print(
        f"{result.run_dir}: {', '.join(scores) or s['status']}, "
        f"{s['steps']} steps{' (stopped early at --max_steps)' if s['stopped_early'] else ''}, {s['wall_time_s']:.1f}s"
    )
    return 0


RECIPE_FLAGS = {"recipe", "sets", "output_dir", "data_dir", "resume", "cpu", "save_every_steps", "save_every_epochs",
                "keep_checkpoints", "log_with", "threads", "workers", "compile", "compile_backend", "channels_last",
                "test_every_epochs"}


def recipe_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunConfig:
    """The one run a recipe (with --set overrides) describes."""
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
    if command == "sweep":
        p.add_argument("--tables_only", action="store_true",
                       help="train nothing: write the tables and plots from the runs already done (the tables name the missing ones)")
    return p


def cmd_sweep(argv: list[str]) -> int:
    p = recipe_parser("sweep", "Run every configuration of a recipe, then write its tables.", "recipe name or .toml path",
                      "default: runs/<recipe>", "print one command per pending run instead of running")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    extra = [f"{k}={v}" for k, v in (("data_dir", args.data_dir), ("cpu", "true" if args.cpu else None)) if v]
    configs = recipe.runs([*args.sets, *extra], output_dir=args.output_dir or f"runs/{recipe.name}")
    if args.print_commands:
        print("\n".join(commands(recipe, args.sets, configs)))
        return 0
    missing = []
    if args.tables_only:
        missing = [c.run_dir().name for c in configs if sweep_status(c) != "done"]
        run_dirs = [c.run_dir() for c in configs if sweep_status(c) == "done"]
        if not run_dirs:
            raise ConfigError(f"sweep {recipe.name} --tables_only: none of its {len(configs)} runs is done")
    else:
        with make_progress() as progress:
            run_dirs = run_sweep(recipe, configs, progress)
    command = "python launch.py" if argv == ["digits"] else "python launch.py sweep " + shlex.join(argv)
    write_sweep_results(recipe, run_dirs, Path(args.results_dir), command, missing)
    return 0


def write_sweep_results(recipe, run_dirs, results_dir: Path, command: str, missing: list[str] = ()) -> None:
    preamble = f"# {recipe.name}\n\n{recipe.description.strip()}\n\nGenerated by `{command}` from the run files.\n\n"
    if missing:
        preamble += (f"Partial: {len(run_dirs)} of {len(run_dirs) + len(missing)} runs done; not run: "
                     f"{', '.join(missing)}.\n\n")
    table = comparison(run_dirs, results_dir / recipe.name, preamble)
    plots = write_plots(run_dirs, results_dir / recipe.name)
    if recipe.reported:
        reproduction = reproduction_table([recipe], load_runs(run_dirs))
        write_text(results_dir / f"{recipe.name}_reproduction.md", preamble + frame_to_markdown(reproduction))
    print_table(table, title=str(results_dir / f"{recipe.name}.md"))
    for plot in plots:
        print(f"wrote {plot}")


def cmd_tune(argv: list[str]) -> int:
    p = recipe_parser("tune", "Tune every optimizer of a recipe's [tune] section on a validation split with an equal "
                      "budget, then run the chosen values on the full training set and write their tables.",
                      "recipe name or .toml path (with a [tune] section)",
                      "default: runs/<recipe>_tune (trials/ and final/ inside)",
                      "print one command per pending trial (once they are done: per pending final run) instead of running")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    extra = [f"{k}={v}" for k, v in (("data_dir", args.data_dir), ("cpu", "true" if args.cpu else None)) if v]
    tuning = plan(recipe, [*args.sets, *extra], args.output_dir or f"runs/{recipe.name}_tune")
    if args.print_commands:
        print("\n".join(pending_commands(tuning, args.sets)))
        return 0
    with make_progress() as progress:
        chosen, final_dirs = run_tuning(tuning, progress)
    results_dir = Path(args.results_dir)
    table = write_tuning_results(tuning, chosen, final_dirs, results_dir, "python launch.py tune " + shlex.join(argv))
    print_table(table, title=str(results_dir / f"{recipe.name}_tuned.md"))
    for written in [results_dir / f"{recipe.name}_tuning.md", *write_plots(final_dirs, results_dir / f"{recipe.name}_tuned")]:
        print(f"wrote {written}")
    return 0


def cmd_reproduction(argv: list[str]) -> int:
    p = Parser(prog="launch.py reproduction", description="Reported against measured for every recipe with a reported number.")
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
    p = Parser(prog="launch.py sharpness", description="Measure the sharpness of finished runs (writes sharpness.json).")
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
    p = Parser(prog="launch.py table", description="Aggregate run directories into a comparison table.")
    p.add_argument("runs", nargs="*", default=["runs"], help="run directories, or folders holding them")
    p.add_argument("--out", default="results/table", help="path prefix for the .csv and .md files")
    args = p.parse_args(argv)
    table = comparison(args.runs, args.out)
    print_table(table, title=f"{args.out}.md")
    return 0


def comparison(runs, out_prefix, preamble: str = ""):
    """write_comparison, with each skipped run reported as one `warning:` line on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunSkipped)
        table = write_comparison(runs, out_prefix, preamble)
    for note in table.attrs.get("notes", []):
        print(f"warning: {note}", file=sys.stderr)
    return table


def cmd_variants(argv: list[str]) -> int:
    Parser(prog="launch.py variants", description="Every optimizer: paper, update rule, defaults, memory, passes.").parse_args(argv)
    print(variants_markdown())
    return 0


COMMANDS = {"sweep": cmd_sweep, "tune": cmd_tune, "table": cmd_table, "reproduction": cmd_reproduction, "sharpness": cmd_sharpness,
            "perf": perf_main, "variants": cmd_variants, "claims": claims_main}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _one_line_warning
    try:
        if not argv:
            return cmd_sweep(["digits"])
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return cmd_run(argv)
    except (ConfigError, DataError, UsageError, CheckpointError, ResultsError) as err:
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
