"""Recipes: TOML files that pin every setting of a benchmark row (or a grid of them) and,
where a paper reports one, the number to reproduce with its source.

    name = "sam_wrn28_10_cifar10"
    description = "..."
    [config]                 # RunConfig fields shared by every run
    dataset = "cifar10"
    [grid]                   # fields with lists: the runs are their Cartesian product
    optimizer = ["sgd", "sam"]
    seed = [0, 1, 2]
    [optimizers.sam]         # settings for one optimizer only (RunConfig fields or its hyperparameters)
    rho = 0.05
    [equal_passes]           # an optimizer also run for this many times the epochs, every seed
    sgd = 2                  # (SGD at as many forward-backward passes as a two-pass method)
    [reported.sam]           # what the paper reports for that optimizer
    accuracy = 97.3          # test accuracy in %
    metric = "last"          # "last" epoch or "best" epoch
    spread = 0.1             # reported std, if any
    tolerance = 0.5          # points: the measured mean's whole 95% interval within it reproduces it (default 0.5)
    source = "Foret et al. 2021, Table 1"

A recipe may extend another (``extends = "cifar10_fit_cpu"``, a recipe name or a path): it starts from
that recipe's sections and merges its own over them, table by table (a value it sets replaces the
inherited one; a table it sets merges into the inherited table). Its ``name`` and ``description`` are
its own.

``--set key=value`` overrides any field (``rho=0.1`` sets a hyperparameter; a list
value such as ``seed=[0,1]`` becomes a grid axis).

A ``[tune]`` section makes the recipe tunable with an equal budget (``launch.py tune``,
``bench.studies.tune``): every optimizer with a grid is trained on each grid point with the trial
seeds, on a stratified validation split of the training set; the point with the best mean
final validation accuracy (ties: the earlier point; the test set is never read) is then run
with the final seeds on the full training set. ``tune`` ignores ``[grid]``'s optimizer and
seed axes (they serve ``sweep``, the untuned comparison) and refuses any other axis.

    [tune]
    val_fraction = 0.1       # the held-out fraction for the trials (split by split_seed)
    seeds = [0]              # trial seeds, the same for every optimizer
    final_seeds = [0, 1, 2]  # seeds of the final runs (val_fraction 0)
    equal_budget = true      # false: grids of different sizes are allowed (the tables say so)
    [tune.grid.sgd]          # per optimizer: lists of values of any RunConfig field or hyperparameter
    lr = [0.02, 0.05, 0.1]
    [tune.grid.looksam]      # several keys: their Cartesian product, in the order written
    alpha = [0.5, 0.7]
    k = [2, 5]
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import ConfigError, RunConfig, check_name
from bench.resolve import resolve
from optimizers import available_optimizers
from optimizers.registry import canonical_name, is_sharpness_aware

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


@dataclass(frozen=True)
class Reported:
    accuracy: float
    metric: str
    source: str
    spread: float | None = None
    note: str = ""
    #: the margin, in points, within which a measured mean reproduces ``accuracy`` (stated in advance; default
    #: bench.report.reproduction.REPRODUCTION_TOLERANCE): the whole 95% interval of the mean must lie within it
    tolerance: float | None = None


@dataclass
class Recipe:
    name: str
    path: Path
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    reported: dict[str, Reported] = field(default_factory=dict)
    #: [equal_passes]: an optimizer also run for this many times the epochs (SGD at the passes of a two-pass method)
    equal_passes: dict[str, int] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)  # the [tune] section as written (checked by bench.studies.tune)
    launcher: dict[str, Any] = field(default_factory=dict)  # [launcher]: SLURM resources (checked by bench.studies.launchers)

    def runs(self, sets: list[str] = (), output_dir: str | None = None, equal_passes: bool = True) -> list[RunConfig]:
        """Every run of the recipe, with ``key=value`` overrides applied (and, unless ``equal_passes`` is False or
        ``epochs`` is set, each [equal_passes] optimizer's run again for its multiple of the epochs, after it)."""
        grid, forced = dict(self.grid), {}
        for key, value in map(parse_assignment, sets):
            if isinstance(value, list):
                if not value:
                    raise ConfigError(f"--set {key}=[]: a grid axis needs at least one value")
                grid[key] = value
            else:
                grid.pop(key, None)
                forced[key] = value
        keys = list(grid)
        configs = []
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            settings = {**self.config, **dict(zip(keys, values)), **forced}
            optimizer = settings["optimizer"] = optimizer_key(settings.get("optimizer", "sgd"), f"recipe {self.name}")
            settings.update(self.optimizers.get(optimizer, {}))
            settings.update(forced)  # the command line has the last word
            if output_dir is not None:
                settings["output_dir"] = output_dir
            configs.append(config_from_settings(settings, self.name))
            factor = self.equal_passes.get(optimizer) if equal_passes else None
            if factor is not None and "epochs" not in forced:  # the compute-matched run beside it
                configs.append(config_from_settings({**settings, "epochs": configs[-1].epochs * factor}, self.name))
        return distinct(configs)


def distinct(configs: list[RunConfig]) -> list[RunConfig]:
    """Each run once, the first of any that compute the same (a grid value repeated, an [optimizers] setting
    over a grid axis, an equal-passes run that is also a grid point): never two jobs in one run folder."""
    by_id: dict[str, RunConfig] = {}
    for config in configs:
        by_id.setdefault(config.run_id(), config)
    return list(by_id.values())


def config_from_settings(settings: dict[str, Any], where: str) -> RunConfig:
    """A validated RunConfig from a recipe's flat settings (RunConfig fields, the rest hyperparameters)."""
    if "run_name" in settings:  # each run's folder is named by its id; one name would give them all one folder
        raise ConfigError(f"{where}: run_name names one run; a recipe's runs are named by their ids")
    fields = {k: v for k, v in settings.items() if k in FIELDS}
    hyperparameters = {**fields.pop("hyperparameters", {}), **{k: v for k, v in settings.items() if k not in FIELDS}}
    if "step_milestones" in fields:
        fields["step_milestones"] = tuple(fields["step_milestones"])
    try:
        return resolve(RunConfig(**fields, hyperparameters=hyperparameters))
    except TypeError as err:
        raise ConfigError(f"recipe {where}: {err}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (numbers, booleans, lists, strings; bare words are strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


#: In a recipe's optimizer grid: every registered sharpness-aware variant, in registration order (a new
#: variant joins every recipe that asks for them).
EVERY_VARIANT = "every-variant"


def optimizer_key(name: Any, where: str) -> str:
    """An optimizer's name as the registry spells it (``SAM`` and ``sam`` alike), or a ConfigError naming ``where``."""
    try:
        return canonical_name(name)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def expand_optimizers(names: list[Any], where: str = "grid.optimizer") -> list[Any]:
    """A grid's optimizer list, each name as the registry spells it, with ``EVERY_VARIANT`` replaced by the
    registered variants not listed elsewhere."""
    names = [n if n == EVERY_VARIANT else optimizer_key(n, where) for n in names]
    if EVERY_VARIANT not in names:
        return names
    listed = [n for n in names if n != EVERY_VARIANT]
    variants = [n for n in available_optimizers() if is_sharpness_aware(n) and n not in listed]
    at = names.index(EVERY_VARIANT)
    return [*listed[:at], *variants, *listed[at:]]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def _recipe_path(name_or_path: str, beside: Path | None = None) -> Path:
    """A recipe by name (bench/recipes) or path; ``beside`` a recipe file (the one that extends it), a relative
    path is relative to that recipe's folder, not to the working directory."""
    path = Path(name_or_path)
    if beside is not None and not path.is_absolute():
        path = beside.parent / path
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_path.replace('-', '_')}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; choose one of: {', '.join(available_recipes())} (or a .toml path)")
    return path


def _extended(data: dict[str, Any], path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``data`` merged over the recipe it ``extends`` (recursively), checked section by section."""
    where = f"recipe {path}"
    parent = data.pop("extends", None)
    _check_sections(data, where)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{where}: extends must be a recipe name, got {parent!r}")
    parent_path = _recipe_path(parent, beside=path).resolve()
    if parent_path in (*seen, path.resolve()):
        raise ConfigError(f"{where}: extends {parent!r}, which extends it back")
    base = _extended(_read_toml(parent_path), parent_path, (*seen, path.resolve()))
    merged = _merged({k: v for k, v in base.items() if k not in ("name", "description")}, data)
    merged["description"] = data["description"] if "description" in data else ""
    return merged


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_recipe(name_or_path: str) -> Recipe:
    path = _recipe_path(name_or_path)
    data = _read_toml(path)
    where = f"recipe {path}"
    data = _extended(data, path)
    reported = {optimizer: _reported_row(row, f"{where}: reported.{optimizer}") for optimizer, row in data["reported"].items()}
    grid = dict(data["grid"])
    if "optimizer" in grid:
        grid["optimizer"] = expand_optimizers(grid["optimizer"], f"{where}: grid.optimizer")
    return Recipe(
        name=check_name(data.get("name", path.stem), f"recipe {path}: name"),
        path=path,
        description=data["description"],
        config=data["config"],
        grid=grid,
        optimizers=data["optimizers"],
        reported=reported,
        equal_passes=_equal_passes(data["equal_passes"], where),
        tune=data["tune"],
        launcher=data["launcher"],
    )


def _equal_passes(section: dict[str, Any], where: str) -> dict[str, int]:
    for optimizer, factor in section.items():
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ConfigError(
                f"{where}: equal_passes.{optimizer} must be how many times the epochs it also trains for (an integer >= 2), "
                f"got {factor!r}"
            )
    return dict(section)


#: A recipe's top-level keys and the TOML type each must have (a missing one takes the empty value).
SECTIONS = {
    "name": str,
    "extends": str,
    "description": str,
    "config": dict,
    "grid": dict,
    "optimizers": dict,
    "reported": dict,
    "equal_passes": dict,
    "tune": dict,
    "launcher": dict,
}
_TOML_TYPE = {str: "a string", dict: "a table", list: "a list"}


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file; a ConfigError naming it when it cannot be read, is not UTF-8 or not TOML."""
    try:
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except OSError as err:
        raise ConfigError(f"recipe {path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path}: not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe {path}: {err}") from None


def _check_sections(data: dict[str, Any], where: str) -> None:
    """Every top-level key known and of its type; every grid axis a non-empty list; every optimizer entry a table.
    Fills in the missing sections (``name`` excepted) with their empty value."""
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}")
    for key, kind in SECTIONS.items():
        if key in data and not isinstance(data[key], kind):
            raise ConfigError(f"{where}: {key} must be {_TOML_TYPE[kind]}, got {data[key]!r}")
        if key not in ("name", "extends"):
            data.setdefault(key, kind())
    for axis, values in data["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{axis} must be a non-empty list of values, got {values!r}")
    for section in ("optimizers", "reported"):
        for optimizer, entry in data[section].items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: {section}.{optimizer} must be a table, got {entry!r}")
    for section in ("optimizers", "reported", "equal_passes"):  # keyed by optimizer: each key the registry's name
        keyed: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in data[section].items():
            name = optimizer_key(key, f"{where}: {section}.{key}")
            if name in keyed:
                raise ConfigError(f"{where}: {section} names {name} twice (as {spelled[name]!r} and {key!r})")
            keyed[name], spelled[name] = value, key
        data[section] = keyed


def _reported_row(row: dict[str, Any], where: str) -> Reported:
    """A reported number, every key checked: accuracy (%), metric, source, and the optional spread, note and tolerance."""
    fields = {f.name: f for f in dataclasses.fields(Reported)}
    unknown = sorted(set(row) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    missing = [name for name in ("accuracy", "metric", "source") if name not in row]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (a reported number needs its accuracy, metric and source)")
    number = (int, float)
    checks = {
        "accuracy": (
            isinstance(row["accuracy"], number) and not isinstance(row["accuracy"], bool) and 0 <= row["accuracy"] <= 100,
            "a number in [0, 100] (a percentage)",
        ),
        "metric": (row["metric"] in ("last", "best"), "'last' or 'best'"),
        "source": (isinstance(row["source"], str) and bool(row["source"].strip()), "a non-empty string"),
        "spread": (
            row.get("spread") is None
            or (isinstance(row["spread"], number) and not isinstance(row["spread"], bool) and row["spread"] >= 0),
            "a number >= 0",
        ),
        "note": (isinstance(row.get("note", ""), str), "a string"),
        "tolerance": (
            row.get("tolerance") is None
            or (isinstance(row["tolerance"], number) and not isinstance(row["tolerance"], bool) and row["tolerance"] > 0),
            "a number > 0 (points)",
        ),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            raise ConfigError(f"{where}.{name} must be {expected}, got {row.get(name)!r}")
    return Reported(**row)
