"""The ``[tune]`` section of a recipe, checked: one ConfigError line naming what is wrong (its format:
bench.studies.recipes; what it does: bench.studies.tune)."""

from __future__ import annotations

import math
from typing import Any

from bench.config import ConfigError
from bench.studies.recipes import Recipe, optimizer_key, parse_assignment

SECTION_KEYS = (
    "val_fraction",
    "folds",
    "seeds",
    "final_seeds",
    "trial_epochs",
    "equal_budget",
    "equal_passes",
    "extend_edges",
    "grid",
)
#: set per run by the tuning: neither a grid key nor a --set may change them
CONTROLLED = ("optimizer", "seed", "val_fraction", "val_fold")  # and split_seed, for a tuning seed other than 0
#: the only [grid] axes a tunable recipe may have (they serve `sweep`, the untuned comparison)
SWEEP_AXES = ("optimizer", "seed")


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _seeds(section: dict, key: str, where: str) -> list[int]:
    seeds = section.get(key)
    ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    need(ok and len(set(seeds)) == len(seeds), f"{where}: {key} must be a non-empty list of distinct integers, got {seeds!r}")
    return seeds


def _by_registry_name(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A table keyed by optimizer, each key the registry's name (``BSAM`` is ``bsam``), none given twice."""
    keyed: dict[str, Any] = {}
    for key, value in table.items():
        name = optimizer_key(key, f"{where}.{key}")
        need(name not in keyed, f"{where} names {name} twice")
        keyed[name] = value
    return keyed


def _grids(section: dict, where: str) -> dict[str, dict[str, list]]:
    grids = section.get("grid")
    need(
        isinstance(grids, dict) and grids and all(isinstance(g, dict) and g for g in grids.values()),
        f"{where}: needs a grid per optimizer, such as [tune.grid.NAME] with KEY = [values]",
    )
    grids = _by_registry_name(grids, f"{where}: grid")
    for optimizer, grid in grids.items():
        for key, values in grid.items():
            need(key not in CONTROLLED, f"{where}: grid.{optimizer}.{key}: {key} is set by the tuning, not by a grid")
            need(isinstance(values, list) and values, f"{where}: grid.{optimizer}.{key} must be a non-empty list, got {values!r}")
    sizes = {optimizer: math.prod(len(v) for v in grid.values()) for optimizer, grid in grids.items()}
    if section.get("equal_budget", True) and len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {n} points" for name, n in sizes.items())
        raise ConfigError(
            f"{where}: unequal budgets ({listed}); give every optimizer as many grid points, or set equal_budget = false"
        )
    return grids


def section(recipe: Recipe) -> dict[str, Any]:
    """The recipe's [tune] section, checked; one-line ConfigError naming what is wrong."""
    where, section = f"recipe {recipe.name} [tune]", recipe.tune
    need(bool(section), f"recipe {recipe.name} has no [tune] section (its format: bench/studies/recipes.py)")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    need(not unknown, f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SECTION_KEYS)}")
    folds = section.get("folds", 1)
    need(
        isinstance(folds, int) and not isinstance(folds, bool) and folds >= 1,
        f"{where}: folds must be an integer >= 1 (k-fold validation: every trial seed on each of k folds), got {folds!r}",
    )
    need(folds == 1 or "val_fraction" not in section, f"{where}: folds {folds} holds out 1/{folds} per fold; drop val_fraction")
    fraction = section.get("val_fraction", 0.1 if folds == 1 else 1 / folds)
    need(
        isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1,
        f"{where}: val_fraction must be in (0, 1), got {fraction!r}",
    )
    need(isinstance(section.get("equal_budget", True), bool), f"{where}: equal_budget must be true or false")
    trial_epochs = section.get("trial_epochs")
    need(
        trial_epochs is None or (isinstance(trial_epochs, int) and not isinstance(trial_epochs, bool) and trial_epochs >= 1),
        f"{where}: trial_epochs must be a positive integer, got {trial_epochs!r}",
    )
    passes = section.get("equal_passes", {})
    passes = _by_registry_name(passes, f"{where}: equal_passes") if isinstance(passes, dict) else passes
    need(
        isinstance(passes, dict) and all(isinstance(f, int) and not isinstance(f, bool) and f >= 2 for f in passes.values()),
        f"{where}: equal_passes maps an optimizer to how many times the epochs it trains for (an integer >= 2), "
        f"such as {{sgd = 2}}; got {passes!r}",
    )
    grids = _grids(section, where)
    missing = [name for name in passes if name not in grids]
    need(not missing, f"{where}: equal_passes names {', '.join(missing)}, which has no tune.grid (it is tuned the same way)")
    extend_edges = section.get("extend_edges", 0)
    need(
        isinstance(extend_edges, int) and not isinstance(extend_edges, bool) and extend_edges >= 0,
        f"{where}: extend_edges must be an integer >= 0 (rounds of extension past a chosen edge), got {extend_edges!r}",
    )
    axes = sorted(set(recipe.grid) - set(SWEEP_AXES))
    need(not axes, f"recipe {recipe.name}: tune takes no [grid] axis but {' and '.join(SWEEP_AXES)} (got {', '.join(axes)})")
    return {
        "val_fraction": float(fraction),
        "folds": folds,
        "trial_epochs": trial_epochs,
        "seeds": _seeds(section, "seeds", where),
        "final_seeds": _seeds(section, "final_seeds", where),
        "equal_budget": section.get("equal_budget", True),
        "grid": grids,
        "equal_passes": passes,
        "extend_edges": extend_edges,
    }


def forced(sets: list[str], grids: dict[str, dict[str, list]]) -> dict[str, Any]:
    forced = dict(map(parse_assignment, sets))
    for key, value in forced.items():
        need(not isinstance(value, list), f"tune: --set {key}= takes one value (the trials come from [tune])")
        tuned = [name for name, grid in grids.items() if key in grid]
        need(
            key not in CONTROLLED and not tuned,
            f"tune: --set {key} would override what the tuning sets"
            + (f" (tune.grid.{', tune.grid.'.join(tuned)})" if tuned else ""),
        )
    return forced
