"""Tuning with an equal budget (``launch.py tune RECIPE``), from a recipe's ``[tune]`` section
(format in bench.studies.recipes).

Every optimizer with a grid gets the same trials: each of its grid points (the same number for
all, unless the recipe sets ``equal_budget = false``) with the same trial seeds, trained on the
training set less a stratified validation split (``val_fraction``, fixed by ``split_seed``, the
same for every seed and optimizer), for the recipe's epochs or, where ``trial_epochs`` is set, for
that many (a shorter schedule of their own: a cheaper, lower-fidelity search, the same for every
optimizer).  Per optimizer, the point with the best mean final validation accuracy over the
trial seeds is chosen, the earlier point among equals; the chooser reads the
trials' ``final_val_acc`` and nothing else, so the test set never enters the choice.  The chosen
values are then run with the final seeds on the full training set (``val_fraction`` 0) and
tabulated, the tuned values marked.

Trials go to ``OUTPUT_DIR/trials`` and final runs to ``OUTPUT_DIR/final``, named by their settings
(``bench.studies.sweep``): tuning resumes where it stopped and never trains a run twice.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import ConfigError, RunConfig
from bench.io import read_json, write_text
from bench.report.tables import frame_to_markdown, write_comparison
from bench.studies.recipes import Recipe, config_from_settings, parse_assignment
from bench.studies.sweep import commands, execution_order, run_sweep, status

SECTION_KEYS = ("val_fraction", "seeds", "final_seeds", "trial_epochs", "equal_budget", "grid")
#: set per run by the tuning: neither a grid key nor a --set may change them
CONTROLLED = ("optimizer", "seed", "val_fraction")
#: the only [grid] axes a tunable recipe may have (they serve `sweep`, the untuned comparison)
SWEEP_AXES = ("optimizer", "seed")


@dataclass(frozen=True)
class Point:
    """One grid point of one optimizer and its trials (one run per trial seed)."""

    optimizer: str  # as the recipe names it
    values: dict[str, Any]
    trials: tuple[RunConfig, ...]

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={_show(value)}" for key, value in self.values.items())


@dataclass
class Plan:
    """Every trial of a tuning, by optimizer and grid point, and what the final runs need."""

    recipe: Recipe
    output_dir: Path
    val_fraction: float
    trial_epochs: int | None  # None: the trials train for the recipe's epochs
    seeds: list[int]
    final_seeds: list[int]
    equal_budget: bool
    grids: dict[str, dict[str, list]]  # per optimizer, as the recipe writes it
    points: dict[str, list[Point]]
    bases: dict[str, dict[str, Any]]  # per optimizer: its settings before the grid point

    def trials(self) -> list[RunConfig]:
        return [config for points in self.points.values() for point in points for config in point.trials]


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _seeds(section: dict, key: str, where: str) -> list[int]:
    seeds = section.get(key)
    ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    _need(ok and len(set(seeds)) == len(seeds), f"{where}: {key} must be a non-empty list of distinct integers, got {seeds!r}")
    return seeds


def _grids(section: dict, where: str) -> dict[str, dict[str, list]]:
    grids = section.get("grid")
    _need(
        isinstance(grids, dict) and grids and all(isinstance(g, dict) and g for g in grids.values()),
        f"{where}: needs a grid per optimizer, such as [tune.grid.NAME] with KEY = [values]",
    )
    for optimizer, grid in grids.items():
        for key, values in grid.items():
            _need(key not in CONTROLLED, f"{where}: grid.{optimizer}.{key}: {key} is set by the tuning, not by a grid")
            _need(
                isinstance(values, list) and values, f"{where}: grid.{optimizer}.{key} must be a non-empty list, got {values!r}"
            )
    sizes = {optimizer: math.prod(len(v) for v in grid.values()) for optimizer, grid in grids.items()}
    if section.get("equal_budget", True) and len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {n} points" for name, n in sizes.items())
        raise ConfigError(
            f"{where}: unequal budgets ({listed}); give every optimizer as many grid points, or set equal_budget = false"
        )
    return grids


def _section(recipe: Recipe) -> dict[str, Any]:
    """The recipe's [tune] section, checked; one-line ConfigError naming what is wrong."""
    where, section = f"recipe {recipe.name} [tune]", recipe.tune
    _need(bool(section), f"recipe {recipe.name} has no [tune] section (its format: bench/recipes.py)")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    _need(not unknown, f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SECTION_KEYS)}")
    fraction = section.get("val_fraction", 0.1)
    _need(
        isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1,
        f"{where}: val_fraction must be in (0, 1), got {fraction!r}",
    )
    _need(isinstance(section.get("equal_budget", True), bool), f"{where}: equal_budget must be true or false")
    trial_epochs = section.get("trial_epochs")
    _need(
        trial_epochs is None or (isinstance(trial_epochs, int) and not isinstance(trial_epochs, bool) and trial_epochs >= 1),
        f"{where}: trial_epochs must be a positive integer, got {trial_epochs!r}",
    )
    axes = sorted(set(recipe.grid) - set(SWEEP_AXES))
    _need(not axes, f"recipe {recipe.name}: tune takes no [grid] axis but {' and '.join(SWEEP_AXES)} (got {', '.join(axes)})")
    return {
        "val_fraction": float(fraction),
        "trial_epochs": trial_epochs,
        "seeds": _seeds(section, "seeds", where),
        "final_seeds": _seeds(section, "final_seeds", where),
        "equal_budget": section.get("equal_budget", True),
        "grid": _grids(section, where),
    }


def _forced(sets: list[str], grids: dict[str, dict[str, list]]) -> dict[str, Any]:
    forced = dict(map(parse_assignment, sets))
    for key, value in forced.items():
        _need(not isinstance(value, list), f"tune: --set {key}= takes one value (the trials come from [tune])")
        tuned = [name for name, grid in grids.items() if key in grid]
        _need(
            key not in CONTROLLED and not tuned,
            f"tune: --set {key} would override what the tuning sets"
            + (f" (tune.grid.{', tune.grid.'.join(tuned)})" if tuned else ""),
        )
    return forced


def plan(recipe: Recipe, sets: list[str], output_dir: str | Path) -> Plan:
    """Every trial of ``recipe``'s [tune] section, validated, with ``key=value`` overrides applied."""
    spec, output_dir = _section(recipe), Path(output_dir)
    forced = _forced(sets, spec["grid"])
    trial_epochs = spec["trial_epochs"]
    shorter = {} if trial_epochs is None else {"epochs": trial_epochs}
    points, bases = {}, {}
    for optimizer, grid in spec["grid"].items():
        bases[optimizer] = {**recipe.config, "optimizer": optimizer, **recipe.optimizers.get(optimizer, {}), **forced}
        epochs = bases[optimizer].get("epochs", RunConfig.epochs)
        _need(
            trial_epochs is None or ("epochs" not in grid and trial_epochs <= epochs),
            f"recipe {recipe.name} [tune]: trial_epochs {trial_epochs} "
            + (
                f"and grid.{optimizer}.epochs both set the trials' epochs"
                if "epochs" in grid
                else f"exceeds the final runs' {epochs} epochs ({optimizer})"
            ),
        )
        points[optimizer] = [
            Point(
                optimizer,
                values,
                tuple(
                    config_from_settings(
                        {
                            **bases[optimizer],
                            **values,
                            **shorter,
                            "seed": seed,
                            "val_fraction": spec["val_fraction"],
                            "output_dir": str(output_dir / "trials"),
                        },
                        recipe.name,
                    )
                    for seed in spec["seeds"]
                ),
            )
            for values in (dict(zip(grid, combo)) for combo in itertools.product(*grid.values()))
        ]
    return Plan(
        recipe,
        output_dir,
        spec["val_fraction"],
        trial_epochs,
        spec["seeds"],
        spec["final_seeds"],
        spec["equal_budget"],
        spec["grid"],
        points,
        bases,
    )


# -- the choice: validation accuracy only ----------------------------------------------------------


def val_accuracy(config: RunConfig) -> float:
    """A trial's score: ``final_val_acc`` of its summary.json, the one key read (-inf if missing or not finite)."""
    try:
        value = read_json(config.run_dir() / "summary.json").get("final_val_acc")
    except (OSError, ValueError, AttributeError):
        return -math.inf
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else -math.inf


def choose(points: list[Point]) -> Point:
    """The point with the best mean trial score, the earlier one among equals."""
    means = [statistics.fmean(map(val_accuracy, point.trials)) for point in points]
    return points[max(range(len(points)), key=lambda i: (means[i], -i))]


def choices(tuning: Plan) -> dict[str, Point]:
    return {optimizer: choose(points) for optimizer, points in tuning.points.items()}


def final_configs(tuning: Plan, chosen: dict[str, Point]) -> dict[str, list[RunConfig]]:
    """Per optimizer, the final seeds of its chosen point, on the full training set."""
    return {
        optimizer: [
            config_from_settings(
                {
                    **tuning.bases[optimizer],
                    **point.values,
                    "seed": seed,
                    "val_fraction": 0.0,
                    "output_dir": str(tuning.output_dir / "final"),
                },
                tuning.recipe.name,
            )
            for seed in tuning.final_seeds
        ]
        for optimizer, point in chosen.items()
    }


# -- running ---------------------------------------------------------------------------------------


def pending_commands(tuning: Plan, sets: list[str]) -> list[str]:
    """One command per pending trial; once every trial is done, one per pending final run; seed by seed
    across optimizers, as ``run_tuning`` trains them."""
    shorter = [] if tuning.trial_epochs is None else ["epochs"]
    lines = _commands(
        tuning, sets, {name: [c for p in points for c in p.trials] for name, points in tuning.points.items()}, shorter
    )
    return lines or _commands(tuning, sets, final_configs(tuning, choices(tuning)), [])


def _keys_of(tuning: Plan, runs: dict[str, list[RunConfig]], extra_keys: list[str]):
    """What each run's command spells out: what the tuning sets (and its optimizer's grid keys)."""
    keys = {
        config.run_dir(): [*CONTROLLED, *tuning.grids[name], *extra_keys] for name, configs in runs.items() for config in configs
    }
    return lambda config: keys[config.run_dir()]


def _commands(tuning: Plan, sets: list[str], runs: dict[str, list[RunConfig]], extra_keys: list[str]) -> list[str]:
    configs = [config for configs in runs.values() for config in configs]
    return commands(tuning.recipe, sets, configs, _keys_of(tuning, runs, extra_keys))


def optimizer_of(tuning: Plan, optimizer: str) -> str:
    """The registry's name of an optimizer as the recipe names it."""
    return tuning.points[optimizer][0].trials[0].optimizer


def run_tuning(tuning: Plan, progress=None, launch=None) -> tuple[dict[str, Point], list[Path]] | None:
    """Train the pending trials, choose, train the pending final runs; the choice and the final run directories.

    ``launch(configs, argv_of, label)``, when given, trains a stage's pending runs instead (as jobs: see
    bench.studies.launchers); a stage it leaves unfinished (jobs not waited for, or failed) ends the tuning
    here (None): the next call goes on from where it stands."""
    name = tuning.recipe.name
    shorter = [] if tuning.trial_epochs is None else ["epochs"]
    trials = {optimizer: [c for p in points for c in p.trials] for optimizer, points in tuning.points.items()}
    if not _stage(tuning, trials, shorter, f"tune {name}: trials", progress, launch):
        return None
    chosen = choices(tuning)
    finals = final_configs(tuning, chosen)
    if not _stage(tuning, finals, [], f"tune {name}: final runs", progress, launch):
        return None
    return chosen, [config.run_dir() for configs in finals.values() for config in configs]


def _stage(tuning: Plan, runs: dict[str, list[RunConfig]], extra_keys: list[str], label: str, progress, launch) -> bool:
    """Train one stage's pending runs; whether all of them are done."""
    configs = [config for configs in runs.values() for config in configs]
    if launch is None:
        run_sweep(tuning.recipe, configs, progress, label=label)
        return True
    keys = _keys_of(tuning, runs, extra_keys)
    launch([c for c in execution_order(configs) if status(c) != "done"], keys, label)
    return all(status(c) == "done" for c in configs)


# -- the tables ------------------------------------------------------------------------------------


def budget(tuning: Plan) -> str:
    trials = {name: len(points) * len(tuning.seeds) for name, points in tuning.points.items()}
    each = f"trial seeds {tuning.seeds}"  # what every optimizer's trials share
    if tuning.trial_epochs is not None:
        final = sorted({base.get("epochs", RunConfig.epochs) for base in tuning.bases.values()})
        each += f", trials of {tuning.trial_epochs} epochs (final runs: {'/'.join(map(str, final))})"
    if len(set(trials.values())) == 1:
        n = next(iter(trials.values()))
        return f"equal budget: {n} trials per optimizer, {n // len(tuning.seeds)} grid points × {each}"
    return f"budgets differ (equal_budget = false): {', '.join(f'{k} {v} trials' for k, v in trials.items())}, {each}"


def _percent(values: list[float]) -> str:
    if not values or not all(math.isfinite(v) for v in values):
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values) * 100:.2f} ± {std * 100:.2f}"


def _trial_status(config: RunConfig) -> str:
    if status(config) != "done":
        return status(config)
    try:
        return str(read_json(config.run_dir() / "summary.json").get("status", "?"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _tables(tuning: Plan, chosen: dict[str, Point]) -> tuple[pd.DataFrame, pd.DataFrame]:
    points, trials = [], []
    for optimizer, grid_points in tuning.points.items():
        for point in grid_points:
            scores = [val_accuracy(c) for c in point.trials]
            points.append(
                {
                    "optimizer": optimizer,
                    "grid point": point.label,
                    "n": len(scores),
                    "val acc (%)": _percent(scores),
                    "chosen": "yes" if point is chosen[optimizer] else "",
                }
            )
            trials += [
                {
                    "optimizer": optimizer,
                    "grid point": point.label,
                    "seed": c.seed,
                    "val acc (%)": f"{s * 100:.2f}" if math.isfinite(s) else "",
                    "status": _trial_status(c),
                    "run": f"`{c.run_dir().name}`",
                }
                for c, s in zip(point.trials, scores)
            ]
    return pd.DataFrame(points), pd.DataFrame(trials)


def tuning_markdown(tuning: Plan, chosen: dict[str, Point], command: str) -> str:
    recipe = tuning.recipe
    grids = "\n".join(
        f"* {optimizer}: " + "; ".join(f"{key} = [{', '.join(map(_show, values))}]" for key, values in grid.items())
        for optimizer, grid in tuning.grids.items()
    )
    points, trials = _tables(tuning, chosen)
    return (
        f"# {recipe.name}: tuning\n\n{recipe.description.strip()}\n\nGenerated by `{command}` from the run files.\n\n"
        f"Trials on a stratified validation split ({tuning.val_fraction:g} of the training set, the same for every run), "
        f"{budget(tuning)}. Chosen per optimizer: the grid point with the best mean final validation accuracy over the "
        "trial seeds (the earlier point among equals); the test set is not read for the choice. The chosen values then "
        f"ran with seeds {tuning.final_seeds} on the full training set: `{recipe.name}_tuned.md`.\n\n"
        f"## Grids\n\n{grids}\n\n## Grid points\n\n{frame_to_markdown(points)}\n## Trials\n\n{frame_to_markdown(trials)}"
    )


def write_tuning_results(
    tuning: Plan, chosen: dict[str, Point], final_dirs: list[Path], results_dir: str | Path, command: str, force: bool = False
) -> pd.DataFrame:
    """``RECIPE_tuning.md`` (grids, every trial, the choice) and ``RECIPE_tuned.{md,csv,tex}`` (the final runs)."""
    recipe, results_dir = tuning.recipe, Path(results_dir)
    preamble = (
        f"# {recipe.name}: tuned\n\n{recipe.description.strip()}\n\nGenerated by `{command}` from the run files. "
        f"Seeds {tuning.final_seeds} on the full training set, with the values in the `tuned` column, chosen on a "
        f"validation split ({budget(tuning)}; the trials and the choice: `{recipe.name}_tuning.md`).\n\n"
    )
    tuned = {optimizer_of(tuning, name): point.label for name, point in chosen.items()}
    table = write_comparison(final_dirs, results_dir / f"{recipe.name}_tuned", preamble, tuned=tuned, force=force)
    write_text(results_dir / f"{recipe.name}_tuning.md", tuning_markdown(tuning, chosen, command))
    return table
