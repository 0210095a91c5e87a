"""The run command: flags (or a recipe, or a run to resume) to one resolved configuration, then one training run."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from accelerate import PartialState
from rich.console import Console

from bench.cli import declarations
from bench.cli.flags import BY_FIELD, FLAGS, RECIPE_FLAGS, given_flags, run_parser
from bench.cli.studies import cmd_sweep
from bench.config import OPERATIONAL, ConfigError, RunConfig
from bench.loop.checkpoint import checkpoints
from bench.loop.train import train
from bench.progress import progress as make_progress
from bench.resolve import resolve, resolved_hyperparameters
from bench.studies.recipes import load_recipe
from bench.variant_flags import selects, setting_flags
from optimizers import available_optimizers, optimizer_class
from optimizers.base import BASE_OPTIMIZERS
from optimizers.registry import canonical_name


def _variant_name(args: argparse.Namespace) -> str:
    """The registered optimizer the flags ask for: ``--sam_type``'s variant, else the base ``--optimizer``."""
    base, variant = args.base_optimizer, args.optimizer
    if base.lower() not in BASE_OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {base!r} (the base optimizer); choose one of: {', '.join(BASE_OPTIMIZERS)}")
    if variant is None or variant.lower() in ("none", *BASE_OPTIMIZERS):
        return base.lower()
    try:
        return canonical_name(variant)
    except ValueError:
        variants = ", ".join(n for n in available_optimizers() if n not in BASE_OPTIMIZERS)
        raise ConfigError(f"unknown --sam_type {variant!r}; choose one of: {variants} (case-insensitive)") from None


def variant_hyperparameters(name: str, given: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """Map the variant flags given onto ``name``'s settings; a boolean setting that selects another
    variant (the seed's ``--sam_type SAM --adaptive``) switches to it. Returns (name, settings, notes)."""
    notes: list[str] = []
    flags = setting_flags(name)
    for flag, value in list(given.items()):
        other = selects(name, flags[flag].name) if flag in flags else None
        if other and value is True:
            notes.append(f"--sam_type {name} --{flag} runs {other}: {optimizer_class(other).paper}")
            name, flags = other, setting_flags(other)
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
    """Map the flags onto a resolved RunConfig; notes report flags that do not apply and renamed semantics."""
    given = {flag: getattr(args, flag) for flag in declarations.names() if getattr(args, flag) is not None}
    name, hyperparameters, notes = variant_hyperparameters(_variant_name(args), given)
    cls = optimizer_class(name)
    if not getattr(cls, "uses_base_optimizer", True):
        declared = {s.name for s in getattr(cls, "settings", ())}
        unused = [f"--{f}" for f in ("optimizer", "momentum", "weight_decay", "nesterov") if f not in declared]
        notes.append(f"{name} has its own update rule: {', '.join(unused)} do not apply")
    fields = {f.field: getattr(args, f.field) for f in FLAGS if f.config}
    config = RunConfig(**{**fields, "optimizer": name, "hyperparameters": hyperparameters})
    base = name if name in BASE_OPTIMIZERS else config.base_optimizer
    if getattr(cls, "uses_base_optimizer", True) and base != "sgd":
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        sgd_only = [f"--{f}" for f in ("momentum", "nesterov") if getattr(config, f) != defaults[f]]
        if sgd_only:
            notes.append(f"{', '.join(sgd_only)} {'set' if len(sgd_only) > 1 else 'sets'} SGD's update, not {base}'s: ignored")
    return resolve(config), notes


def resume_config(path: str, argv: list[str]) -> RunConfig:
    """The settings of the run in directory ``path``. A flag given beside ``--resume`` must say what the run
    already is: one that changes a setting (or that the run's optimizer does not use) is refused, naming it."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"--resume {path}: no config.json there (expected a run directory, or 'auto')")
    try:
        saved = RunConfig.read(path)
    except ConfigError as err:
        raise ConfigError(f"--resume {path}: {err}") from None
    saved.output_dir, saved.run_name = str(Path(path).parent), Path(path).name
    given = {
        field: spelling
        for field, spelling in given_flags(argv).items()
        if field not in ("resume", "output_dir", "run_name", "sets")
    }
    args = run_parser().parse_args(argv) if given else None
    for field in given:  # how the run is carried out, not what it computes (--data_dir, --compile, ...): taken
        if field in OPERATIONAL and field in BY_FIELD:
            setattr(saved, field, getattr(args, field))
    recorded_data = saved.data_id
    resolve(saved)  # a recorded fingerprint must match the data found
    if recorded_data is None:  # none recorded (a download, or a run older than fingerprints): its id stays its own
        saved.data_id = None
    if not given:
        return saved
    differ = []
    for field, spelling in given.items():
        if field in OPERATIONAL and field in BY_FIELD:
            continue
        if field in BY_FIELD and BY_FIELD[field].config:
            there, asked = getattr(saved, field), getattr(args, field)
            if field == "optimizer":  # --sam_type: the variant, or none (the base optimizer alone)
                asked = _variant_name(argparse.Namespace(base_optimizer=saved.base_optimizer, optimizer=asked))
            elif field == "base_optimizer":
                asked = str(asked).lower()
            elif field in ("dataset", "arch"):
                asked = getattr(resolve(dataclasses.replace(saved, **{field: asked})), field)
            if there != asked:
                differ.append(f"{spelling} ({there!r} there, {asked!r} given)")
        elif field in BY_FIELD:
            differ.append(f"{spelling} (a new run's flag)")
        else:  # a variant's own setting
            flags = setting_flags(saved.optimizer)
            if field not in flags:
                differ.append(f"{spelling} (not used by {saved.optimizer})")
                continue
            name, value = flags[field].name, getattr(args, field)
            there = saved.hyperparameters.get(name, resolved_hyperparameters(saved).get(name))
            if there != value:
                differ.append(f"{spelling} ({there!r} there, {value!r} given)")
    if differ:
        raise ConfigError(
            f"--resume {path}: settings differ from its config.json: {'; '.join(differ)}; drop them to resume, or start a new run"
        )
    return saved


#: run flags that ``--suite`` hands to its sweep (with ``--set``); any other is refused
SUITE_FLAGS = ("output_dir", "data_dir", "cpu")


def suite_argv(argv: list[str], args) -> list[str]:
    """``--suite RECIPE`` as ``sweep RECIPE``'s arguments: its --set values and the flags a sweep takes too; any
    other flag written (its default value included), which the sweep would not apply, is refused in one line."""
    given = [k for k in given_flags(argv) if k not in ("suite", "sets")]
    other = [k for k in given if k not in SUITE_FLAGS]
    if other:
        raise ConfigError(
            f"--suite {args.suite} runs the recipe's sweep, which takes --set FIELD=VALUE, --output_dir, --data_dir and "
            f"--cpu; got --{', --'.join(other)} (as --set FIELD=VALUE, or see `launch.py sweep --help`)"
        )
    argv = [args.suite, *[f"--set={s}" for s in args.sets]]
    for key in given:
        value = getattr(args, key)
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv


def cmd_run(argv: list[str]) -> int:
    parser = run_parser()
    args = parser.parse_args(argv)
    if args.suite:
        return cmd_sweep(suite_argv(argv, args))
    console = Console(stderr=True, soft_wrap=True)  # a long line stays one line in a log
    if args.resume not in (None, "auto"):
        config, notes = resume_config(args.resume, argv), []
    elif args.recipe:
        config, notes = recipe_config(parser, args), []
    else:
        config, notes = config_from_args(args)
    if args.resume == "auto" and not checkpoints(config.run_dir()) and not (config.run_dir() / "summary.json").is_file():
        notes.append(
            f"--resume auto: no run with these settings in {config.output_dir} (id {config.run_id()}); starting a new one"
        )
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
    scores = [
        f"{split} acc {s[f'final_{split}_acc']:.4f}" for split in ("val", "test") if s.get(f"final_{split}_acc") is not None
    ]
    if s.get("best_test_acc") is not None:
        scores[-1] += f" (best {s['best_test_acc']:.4f})"
    console.print(
        f"{result.run_dir}: {', '.join(scores) or s['status']}, "
        f"{s['steps']} steps{' (stopped early at --max_steps)' if s['stopped_early'] else ''}, {s['wall_time_s']:.1f}s"
    )
    return 0


def recipe_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunConfig:
    """The one run a recipe (with --set overrides) describes."""
    stray = [
        BY_FIELD[k].name if k in BY_FIELD else f"--{k}"
        for k, v in vars(args).items()
        if k not in RECIPE_FLAGS and v != parser.get_default(k)
    ]
    if stray:
        raise ConfigError(f"with --recipe, change settings with --set field=value (got {', '.join(stray)})")
    recipe = load_recipe(args.recipe)
    configs = recipe.runs(args.sets)
    if len(configs) != 1:
        raise ConfigError(
            f"recipe {recipe.name} describes {len(configs)} runs; pick one with --set "
            f"(grid: {', '.join([*recipe.grid, *(['epochs'] if recipe.equal_passes else [])])}) "
            f"or run them all with `launch.py sweep {recipe.name}`"
        )
    given = {
        k: v for k, v in vars(args).items() if k in RECIPE_FLAGS - {"recipe", "sets", "resume"} and v != parser.get_default(k)
    }
    return resolve(dataclasses.replace(configs[0], **given))
