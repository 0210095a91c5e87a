"""Tuning with an equal budget (``launch.py tune RECIPE``), from a recipe's ``[tune]`` section
(format in bench.studies.recipes).

Every optimizer with a grid gets the same trials: each of its grid points (the same number for
all, unless the recipe sets ``equal_budget = false``) with the same trial seeds, trained on the
training set less a stratified validation split (``val_fraction``, fixed by ``split_seed``, the
same for every seed and optimizer; with ``folds = k``, k-fold validation: every trial seed on each
of the k folds of 1/k, so that every training image is validated once), for the recipe's epochs
or, where ``trial_epochs`` is set, for that many (a shorter schedule of their own: a cheaper,
lower-fidelity search, the same for every optimizer).  Per optimizer, the point with the best mean final validation accuracy over the
trials (seeds and folds) is chosen, the earlier point among equals; the chooser reads the
trials' ``final_val_acc`` and nothing else, and a trial never evaluates the test set (trials of older
records did, and their test accuracies sit unread in the tuning tables' per-run files), so it cannot enter the choice.  The chosen
values are then run with the final seeds on the full training set (``val_fraction`` 0) and
tabulated, the tuned values marked.

``equal_passes = {sgd = 2}`` adds a contender per named optimizer: the same optimizer tuned on the same
grid for twice the epochs (trials and final runs), so that it makes as many forward-backward passes as a
two-pass method: the compute-matched baseline. Its rows carry their epochs; claims with ``b_epochs``
compare against it (bench/report/claims.toml).

Trials go to ``OUTPUT_DIR/trials`` and final runs to ``OUTPUT_DIR/final``, named by their settings
(``bench.studies.sweep``): tuning resumes where it stopped and never trains a run twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import ConfigError, RunConfig
from bench.io import read_json
from bench.studies.recipes import Recipe, config_from_settings
from bench.studies.sweep import commands, execution_order, run_sweep, status
from bench.studies.tune_spec import forced as forced_settings
from bench.studies.tune_spec import need, section


@dataclass(frozen=True)
class Point:
    """One grid point of one optimizer and its trials (one run per trial seed)."""

    optimizer: str  # the contender, as the recipe names it
    values: dict[str, Any]
    trials: tuple[RunConfig, ...]
    extension: int = 0  # the round of grid extension that added it (0: the recipe's grid)

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={show(value)}" for key, value in self.values.items())


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
    grids: dict[str, dict[str, list]]  # per contender (an optimizer, or one at equal passes), as the recipe writes it
    points: dict[str, list[Point]]
    bases: dict[str, dict[str, Any]]  # per contender: its settings before the grid point
    #: per contender at equal passes (``equal_passes``): how many times the recipe's epochs it trains for
    factors: dict[str, int] = dataclasses.field(default_factory=dict)
    #: rounds of grid extension past a chosen edge (``extend_edges``), the same limit for every contender
    extend_edges: int = 0
    #: 0, or another whole tuning: trial seeds shifted by 1000 x it and another validation split (split_seed + it)
    tuning_seed: int = 0
    #: k-fold validation (``folds``): each trial seed runs on each fold; 1: one validation split
    folds: int = 1

    @property
    def trials_per_point(self) -> int:
        return len(self.seeds) * self.folds

    @property
    def suffix(self) -> str:
        """What this tuning's tables add to their names: "" for tuning seed 0, "_seedN" for another."""
        return f"_seed{self.tuning_seed}" if self.tuning_seed else ""

    def trials(self) -> list[RunConfig]:
        return [config for points in self.points.values() for point in points for config in point.trials]


def show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def plan(recipe: Recipe, sets: list[str], output_dir: str | Path, tuning_seed: int = 0) -> Plan:
    """Every trial of ``recipe``'s [tune] section, validated, with ``key=value`` overrides applied; with a
    ``tuning_seed`` other than 0, another whole tuning of it (other trial seeds, another validation split)."""
    spec, output_dir = section(recipe), Path(output_dir)
    forced = forced_settings(sets, spec["grid"])
    trial_epochs = spec["trial_epochs"]
    grids = {name: dict(grid) for name, grid in spec["grid"].items()}
    factors = {}
    for name, factor in spec["equal_passes"].items():  # the same optimizer, tuned the same way, for factor x the epochs
        grids[f"{name} at {factor}x epochs"], factors[f"{name} at {factor}x epochs"] = dict(spec["grid"][name]), factor
    tuning = Plan(
        recipe, output_dir, spec["val_fraction"], trial_epochs, spec["seeds"], spec["final_seeds"], spec["equal_budget"],
        grids, {}, {}, factors, spec["extend_edges"], tuning_seed, spec["folds"],
    )  # fmt: skip
    for contender, grid in grids.items():
        optimizer, factor = contender.split(" at ")[0], factors.get(contender, 1)
        base = {**recipe.config, "optimizer": optimizer, **recipe.optimizers.get(optimizer, {}), **forced}
        epochs = base.get("epochs", RunConfig.epochs)
        need(
            isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
            f"recipe {recipe.name}: epochs must be an integer >= 1, got {epochs!r}",
        )
        base["epochs"] = epochs * factor
        tuning.bases[contender] = base
        need(
            trial_epochs is None or ("epochs" not in grid and trial_epochs <= epochs),
            f"recipe {recipe.name} [tune]: trial_epochs {trial_epochs} "
            + (
                f"and grid.{optimizer}.epochs both set the trials' epochs"
                if "epochs" in grid
                else f"exceeds the final runs' {epochs} epochs ({optimizer})"
            ),
        )
        combos = (dict(zip(grid, combo)) for combo in itertools.product(*grid.values()))
        tuning.points[contender] = [grid_point(tuning, contender, values) for values in combos]
    return tuning


def scaled(tuning: Plan, contender: str, values: dict[str, Any]) -> dict[str, Any]:
    """A grid point's settings for ``contender``: an equal-passes contender trains ``epochs`` (a grid axis too)
    for its factor times the epochs."""
    factor = tuning.factors.get(contender, 1)
    return {**values, "epochs": values["epochs"] * factor} if "epochs" in values else values


def grid_point(tuning: Plan, contender: str, values: dict[str, Any], extension: int = 0) -> Point:
    """The trials of one grid point: one run per trial seed (and fold) on the training set less the validation split."""
    shorter = {} if tuning.trial_epochs is None else {"epochs": tuning.trial_epochs * tuning.factors.get(contender, 1)}
    # the test set is never evaluated in a trial (an operational setting: the trial's id is unchanged)
    settings = {"val_fraction": tuning.val_fraction, "test_every_epochs": 0, "output_dir": str(tuning.output_dir / "trials")}
    if tuning.tuning_seed:
        base_split = tuning.bases[contender].get("split_seed", RunConfig.split_seed)
        settings["split_seed"] = base_split + tuning.tuning_seed
    return Point(
        contender,
        values,
        tuple(
            config_from_settings(
                {
                    **tuning.bases[contender],
                    **scaled(tuning, contender, values),
                    **shorter,
                    "seed": seed + 1000 * tuning.tuning_seed,
                    **settings,
                    "val_fold": fold,  # 0 (one split, or the first fold) is left out of a run's id
                },
                tuning.recipe.name,
            )
            for seed in tuning.seeds
            for fold in range(tuning.folds)
        ),
        extension,
    )


# -- the choice: validation accuracy only ----------------------------------------------------------


def trial_score(final_val_acc: Any) -> float:
    """A trial's score from its final validation accuracy, as its summary or its record holds it: -inf
    where there is none or it is not finite (a diverged trial ranks last)."""
    ok = isinstance(final_val_acc, (int, float)) and not isinstance(final_val_acc, bool) and math.isfinite(final_val_acc)
    return float(final_val_acc) if ok else -math.inf


def val_accuracy(config: RunConfig) -> float:
    """A trial's score from its run: ``final_val_acc`` of its summary.json, the one key read."""
    try:
        return trial_score(read_json(config.run_dir() / "summary.json").get("final_val_acc"))
    except (OSError, ValueError, AttributeError):
        return -math.inf


#: a trial's score: its final validation accuracy (-inf where there is none), from its run or its record
Score = Callable[[RunConfig], float]


def choose(points: list[Point], score: Score = val_accuracy) -> Point:
    """The point with the best mean trial score, the earlier one among equals."""
    means = [statistics.fmean(map(score, point.trials)) for point in points]
    return points[max(range(len(points)), key=lambda i: (means[i], -i))]


def choices(tuning: Plan, score: Score = val_accuracy) -> dict[str, Point]:
    return {optimizer: choose(points, score) for optimizer, points in tuning.points.items()}


def final_configs(tuning: Plan, chosen: dict[str, Point]) -> dict[str, list[RunConfig]]:
    """Per optimizer, the final seeds of its chosen point, on the full training set."""
    return {
        optimizer: [
            config_from_settings(
                {
                    **tuning.bases[optimizer],
                    **scaled(tuning, optimizer, point.values),
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


# -- interior optima: a choice on an edge of its grid extends the grid there ------------------------


def _beyond(values: list, side: int) -> Any:
    """The next value past the lowest (side -1) or highest (+1) of a numeric axis: one step of the grid's own
    spacing there: arithmetic where the grid is evenly spaced (three values or more) or not all positive, else
    geometric (log-spaced grids; integers rounded, and an arithmetic step where rounding gives the edge back)."""
    ordered = sorted(set(values))
    edge, inner = (ordered[0], ordered[1]) if side < 0 else (ordered[-1], ordered[-2])
    steps = [b - a for a, b in zip(ordered, ordered[1:])]
    even = len(ordered) >= 3 and all(math.isclose(d, steps[0], rel_tol=1e-6) for d in steps)
    integers = all(isinstance(v, int) for v in ordered)
    if not even and min(ordered) > 0:
        nxt = edge * edge / inner
        nxt = round(nxt) if integers else float(f"{nxt:.6g}")
        if nxt != edge:
            return nxt
    nxt = edge + (edge - inner)
    return nxt if integers else float(f"{nxt:.6g}")


def edges(tuning: Plan, point: Point) -> list[tuple[str, int]]:
    """(axis, side) for each numeric axis of the point's grid on whose lowest (-1) or highest (+1) value it sits."""
    found = []
    for key, values in tuning.grids[point.optimizer].items():
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numeric) == len(values) and len(set(values)) >= 2 and point.values[key] in (min(values), max(values)):
            found.append((key, -1 if point.values[key] == min(values) else 1))
    return found


def extend(tuning: Plan, round_: int, score: Score = val_accuracy) -> dict[str, list[RunConfig]]:
    """One round of extension: for every contender whose choice sits on an edge, the next value past that edge
    (the other axes at the chosen values), added to its grid and points; the new trials by contender. A value
    outside the setting's allowed range is not added (the choice then stays on the edge, and says so)."""
    added: dict[str, list[RunConfig]] = {}
    for contender, point in choices(tuning, score).items():
        for key, side in edges(tuning, point):
            value = _beyond(tuning.grids[contender][key], side)
            try:
                new = grid_point(tuning, contender, {**point.values, key: value}, round_)
            except ConfigError:
                continue
            tuning.grids[contender][key] = sorted([*tuning.grids[contender][key], value])
            tuning.points[contender].append(new)
            added.setdefault(contender, []).extend(new.trials)
    return added


# -- running ---------------------------------------------------------------------------------------


def replay(tuning: Plan, score: Score) -> dict[str, Point]:
    """The choice as the tuning made it, from its trials' scores alone (their records): the extension rounds
    replayed, no run trained."""
    for round_ in range(1, tuning.extend_edges + 1):
        if not extend(tuning, round_, score):
            break
    return choices(tuning, score)


def pending_commands(tuning: Plan, sets: list[str]) -> list[str]:
    """One command per pending trial; once every trial is done, one per pending final run; seed by seed
    across optimizers, as ``run_tuning`` trains them."""
    lines = _commands(tuning, sets, {name: [c for p in points for c in p.trials] for name, points in tuning.points.items()})
    for round_ in range(1, 1 + (tuning.extend_edges if not lines else 0)):  # a round's trials once the one before is done
        added = extend(tuning, round_)
        lines = _commands(tuning, sets, added) if added else []
        if lines or not added:
            break
    return lines or _commands(tuning, sets, final_configs(tuning, choices(tuning)))


def _commands(tuning: Plan, sets: list[str], runs: dict[str, list[RunConfig]]) -> list[str]:
    return commands(tuning.recipe, sets, [config for configs in runs.values() for config in configs])


def optimizer_of(tuning: Plan, optimizer: str) -> str:
    """The registry's name of an optimizer as the recipe names it."""
    return tuning.points[optimizer][0].trials[0].optimizer


def run_tuning(tuning: Plan, progress=None, launch=None) -> tuple[dict[str, Point], list[Path]] | None:
    """Train the pending trials, choose, train the pending final runs; the choice and the final run directories.

    ``launch(configs, label)``, when given, trains a stage's pending runs instead (as jobs: see
    bench.studies.launchers); a stage it leaves unfinished (jobs not waited for, or failed) ends the tuning
    here (None): the next call goes on from where it stands."""
    name = tuning.recipe.name
    trials = {optimizer: [c for p in points for c in p.trials] for optimizer, points in tuning.points.items()}
    if not _stage(tuning, trials, f"tune {name}: trials", progress, launch):
        return None
    for round_ in range(1, tuning.extend_edges + 1):
        added = extend(tuning, round_)
        if not added:
            break
        if not _stage(tuning, added, f"tune {name}: trials past an edge, round {round_}", progress, launch):
            return None
    chosen = choices(tuning)
    finals = final_configs(tuning, chosen)
    if not _stage(tuning, finals, f"tune {name}: final runs", progress, launch):
        return None
    return chosen, [config.run_dir() for configs in finals.values() for config in configs]


def _stage(tuning: Plan, runs: dict[str, list[RunConfig]], label: str, progress, launch) -> bool:
    """Train one stage's pending runs; whether all of them are done."""
    configs = [config for configs in runs.values() for config in configs]
    if launch is None:
        run_sweep(tuning.recipe, configs, progress, label=label)
        return True
    launch([c for c in execution_order(configs) if status(c) != "done"], label)
    return all(status(c) == "done" for c in configs)
