"""The tables of a tuning (``launch.py tune RECIPE``): ``RECIPE_tuning.md`` (the grids, every trial, the choice)
and ``RECIPE_tuned.{md,csv,tex}`` (the final runs, the tuned values marked), from the run files."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import RunConfig
from bench.io import write_text
from bench.report import records
from bench.report.claims import evaluate, load_claims
from bench.report.runs import ResultsError, read_records, read_runs
from bench.report.tables import frame_to_markdown, write_comparison
from bench.studies.tune import Plan, Point, edges, optimizer_of, show, trial_score


def budget(tuning: Plan) -> str:
    per_point = tuning.trials_per_point
    trials = {name: sum(not p.extension for p in points) * per_point for name, points in tuning.points.items()}
    extra = {name: sum(bool(p.extension) for p in points) * per_point for name, points in tuning.points.items()}
    each = f"trial seeds {tuning.seeds}"  # what every optimizer's trials share
    if tuning.folds > 1:
        each += f" × {tuning.folds} validation folds"
    if tuning.trial_epochs is not None:
        final = sorted({base.get("epochs", RunConfig.epochs) for base in tuning.bases.values()})
        each += f", trials of {tuning.trial_epochs} epochs (final runs: {'/'.join(map(str, final))})"
    if tuning.factors:
        each += ", " + ", ".join(
            f"{name}: the same grid for {f}x the epochs (equal passes)" for name, f in tuning.factors.items()
        )
    if tuning.extend_edges:
        each += f"; a choice on an edge of its grid extends the grid there by one step, up to {tuning.extend_edges} round{'s' if tuning.extend_edges > 1 else ''}"
        each += " (trials past an edge: " + (", ".join(f"{k} {v}" for k, v in extra.items() if v) or "none") + ")"
    if len(set(trials.values())) == 1:
        n = next(iter(trials.values()))
        return f"equal budget: {n} trials per optimizer, {n // per_point} grid points × {each}"
    return f"budgets differ (equal_budget = false): {', '.join(f'{k} {v} trials' for k, v in trials.items())}, {each}"


def _percent(values: list[float]) -> str:
    if not values or not all(math.isfinite(v) for v in values):
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values) * 100:.2f} ± {std * 100:.2f}"


#: a trial's per-run record by its configuration (None: no finished record): from the run folders or a per-run file
Find = Callable[[RunConfig], "dict[str, Any] | None"]


def trial_records() -> Find:
    """Each finished trial's per-run record, read from its run folder when first asked for (bench.report.runs):
    trials added later (a grid's extension) are found too."""
    cache: dict[str, dict[str, Any] | None] = {}

    def find(config: RunConfig) -> dict[str, Any] | None:
        run = config.run_dir()
        if run.name not in cache:
            try:
                found = read_records([run])[0] if run.is_dir() else []
            except ResultsError:
                found = []
            cache[run.name] = next((r for r in found if r["status"] != "unfinished"), None)
        return cache[run.name]

    return find


def recorded_score(find: Find):
    """A trial's score from its record: its final validation accuracy, -inf where there is none."""

    def score(config: RunConfig) -> float:
        record = find(config)
        return trial_score(None if record is None else record.get("final_val_acc"))

    return score


def _chosen(tuning: Plan, point: Point) -> str:
    """ "yes", or where the choice still sits on an edge of its (extended) grid."""
    found = edges(tuning, point)
    where = ", ".join(f"{key} {'lowest' if side < 0 else 'highest'}" for key, side in found)
    return f"yes, on an edge ({where})" if found else "yes"


def _tables(tuning: Plan, chosen: dict[str, Point], find: Find) -> tuple[pd.DataFrame, pd.DataFrame]:
    points, trials = [], []
    for optimizer, grid_points in tuning.points.items():
        for point in grid_points:
            scores = [recorded_score(find)(c) for c in point.trials]
            points.append(
                {
                    "optimizer": optimizer,
                    "grid point": point.label + (f" (extension {point.extension})" if point.extension else ""),
                    "n": len(scores),
                    "val acc (%)": _percent(scores),
                    "chosen": _chosen(tuning, point) if point is chosen[optimizer] else "",
                }
            )
            trials += [
                {
                    "optimizer": optimizer,
                    "grid point": point.label,
                    "seed": c.seed,
                    **({"fold": c.val_fold} if tuning.folds > 1 else {}),
                    "val acc (%)": f"{s * 100:.2f}" if math.isfinite(s) else "",
                    "status": (find(c) or {}).get("status", "not run"),
                    # the run as recorded: its id holds the data's fingerprint, which the plan lacks where the data is absent
                    "run": f"`{(find(c) or {}).get('run_id') or c.run_dir().name}`",
                }
                for c, s in zip(point.trials, scores)
            ]
    return pd.DataFrame(points), pd.DataFrame(trials)


def compared_markdown(tuning: Plan, chosen: dict[str, Point], first: dict[str, Point] | None) -> str:
    """Tuning seed N's choices beside tuning seed 0's (``first``; None: that tuning is not complete here)."""
    if first is None:
        return "## Against tuning seed 0\n\nTuning seed 0 has not run all its trials here: nothing to compare.\n"
    rows = [
        {
            "optimizer": name,
            "tuning seed 0": first[name].label,
            f"tuning seed {tuning.tuning_seed}": point.label,
            "same choice": "yes" if first[name].values == point.values else "no",
        }
        for name, point in chosen.items()
        if name in first
    ]
    changed = sum(row["same choice"] == "no" for row in rows)
    return (
        f"## Against tuning seed 0\n\nThe same tuning with other trial seeds and another validation split: {changed} of "
        f"{len(rows)} choices differ from tuning seed 0's.\n\n{frame_to_markdown(pd.DataFrame(rows))}"
    )


def verdicts_markdown(tuning: Plan, first_finals: Path, finals: Path) -> str:
    """The claims (bench/report/claims.toml) on tuning seed 0's final runs and on this tuning's, side by side:
    how far a verdict depends on the luck of one tuning. From the two tunings' per-run files."""
    title = "## Verdicts against tuning seed 0\n\n"
    if not first_finals.is_file():
        return f"{title}Tuning seed 0's final runs have no per-run file here (`{first_finals.name}`): nothing to compare.\n"
    claims = load_claims()
    before, after = (evaluate(claims, read_runs([path])[0]) for path in (first_finals, finals))

    def key(row: dict) -> tuple[str, str, str]:
        return row["claim"].text, row["a"].optimizer, row["b"].optimizer

    def shown(row: dict) -> str:  # the verdict and the paired interval it rests on
        return row["verdict"] + (f", {row['difference'].describe()}" if "difference" in row else "")

    def kind(row: dict) -> str:  # the verdict without its reason ("not testable here: ..." -> "not testable here")
        return row["verdict"].split(":")[0]

    earlier = {key(row): row for row in before}
    rows = [
        {
            "claim": row["claim"].text,
            "A vs B": f"{row['a'].optimizer} vs {row['b'].optimizer}",
            "tuning seed 0": shown(earlier[key(row)]),
            f"tuning seed {tuning.tuning_seed}": shown(row),
            "same verdict": "yes" if kind(earlier[key(row)]) == kind(row) else "no",
        }
        for row in after
        if key(row) in earlier
    ]
    if not rows:
        return f"{title}No claim compares two optimizers that both tunings ran.\n"
    changed = sum(row["same verdict"] == "no" for row in rows)
    return (
        f"{title}The claims of `bench/report/claims.toml` on each tuning's final runs (paired by seed, Holm-adjusted within "
        f"each tuning; a verdict compared without its reason): {changed} of {len(rows)} verdicts differ from tuning seed 0's.\n\n{frame_to_markdown(pd.DataFrame(rows))}"
    )


def tuning_markdown(
    tuning: Plan,
    chosen: dict[str, Point],
    command: str,
    find: Find,
    first: dict[str, Point] | None = None,
    verdicts: str = "",
) -> str:
    recipe = tuning.recipe
    grids = "\n".join(
        f"* {optimizer}: " + "; ".join(f"{key} = [{', '.join(map(show, values))}]" for key, values in grid.items())
        for optimizer, grid in tuning.grids.items()
    )
    points, trials = _tables(tuning, chosen, find)
    return (
        f"# {recipe.name}: tuning\n\n{recipe.description.strip()}\n\nGenerated by `{command}` from the run files "
        f"(`{command} --from_records` rebuilds both tables from `{recipe.name}_tuning{tuning.suffix}_runs.csv` and "
        f"`{recipe.name}_tuned{tuning.suffix}_runs.csv` alone).\n\n"
        + (
            f"Trials on a stratified validation split ({tuning.val_fraction:g} of the training set, the same for every run), "
            if tuning.folds == 1
            else f"Trials by {tuning.folds}-fold validation (stratified folds of {tuning.val_fraction:.3g} of the training "
            "set, the same for every run; every training image is validated once per trial seed), "
        )
        + f"{budget(tuning)}. Chosen per optimizer: the grid point with the best mean final validation accuracy over the "
        f"{'trial seeds' if tuning.folds == 1 else 'trials (seeds and folds)'} (the earlier point among equals); the test set is not read for the choice. The chosen values then "
        f"ran with seeds {tuning.final_seeds} on the full training set: `{recipe.name}_tuned{tuning.suffix}.md`.\n\n"
        f"## Grids\n\n{grids}\n\n## Grid points\n\n{frame_to_markdown(points)}\n## Trials\n\n{frame_to_markdown(trials)}"
        + (f"\n{compared_markdown(tuning, chosen, first)}" if tuning.tuning_seed else "")
        + (f"\n{verdicts}" if verdicts else "")
    )


def write_tuning_results(
    tuning: Plan,
    chosen: dict[str, Point],
    finals: list[Path] | pd.DataFrame,
    results_dir: str | Path,
    command: str,
    force: bool = False,
    find: Find | None = None,
    first: dict[str, Point] | None = None,
) -> pd.DataFrame:
    """``RECIPE_tuning.md`` (grids, every trial, the choice) with the trials' per-run file
    ``RECIPE_tuning_runs.csv``, and ``RECIPE_tuned.{md,csv,tex}`` (the final runs: their folders, or a frame of
    their records) with theirs. ``find``: the trials' records (default: read from their folders). Another tuning
    seed's files are named ``RECIPE_tuning_seedN.md``, ..., and compare its choices with ``first``, tuning seed 0's."""
    recipe, results_dir, suffix = tuning.recipe, Path(results_dir), tuning.suffix
    find = find or trial_records()
    trials = [record for record in map(find, tuning.trials()) if record is not None]
    preamble = (
        f"# {recipe.name}: tuned\n\n{recipe.description.strip()}\n\nGenerated by `{command}` from the run files "
        f"(`{command} --from_records` rebuilds the tables from `{recipe.name}_tuning{suffix}_runs.csv` and "
        f"`{recipe.name}_tuned{suffix}_runs.csv` alone). "
        f"Seeds {tuning.final_seeds} on the full training set, with the values in the `tuned` column, chosen on a "
        f"validation split ({budget(tuning)}; the trials and the choice: `{recipe.name}_tuning{suffix}.md`).\n\n"
    )
    tuned: dict[str, str] = {}  # by registry name: an optimizer and its contender at equal passes share one
    for name, point in chosen.items():
        label = point.label if name not in tuning.factors else f"{tuning.factors[name]}x epochs: {point.label}"
        optimizer = optimizer_of(tuning, name)
        tuned[optimizer] = f"{tuned[optimizer]}; {label}" if optimizer in tuned else label
    table = write_comparison(finals, results_dir / f"{recipe.name}_tuned{suffix}", preamble, tuned=tuned, force=force)
    write_text(records.path_for(results_dir / f"{recipe.name}_tuning{suffix}"), records.to_csv(trials))
    verdicts = ""
    if tuning.tuning_seed:
        first_finals = records.path_for(results_dir / f"{recipe.name}_tuned")
        verdicts = verdicts_markdown(tuning, first_finals, records.path_for(results_dir / f"{recipe.name}_tuned{suffix}"))
    write_text(results_dir / f"{recipe.name}_tuning{suffix}.md", tuning_markdown(tuning, chosen, command, find, first, verdicts))
    return table
