"""Sweeps: run every configuration of a recipe, skipping finished runs and resuming
interrupted ones, then write its tables and plots from the run files.

Run directories are named by their configuration's id, so a sweep can be stopped and
started again, run piecewise on several machines (``--print_commands``) into one
results directory, and it never runs, loses or counts a configuration twice. Runs go
one at a time: two trainings sharing the CPU would slow each other and spoil the times.
They go seed by seed (``execution_order``): every configuration's first seed before any
configuration's second, so that a slow spell of the machine falls on one seed of many
configurations, which the median over seeds and its spread then show, rather than on
every seed of the few configurations that happened to run during it.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections import Counter
from pathlib import Path

from bench.config import RunConfig
from bench.loop.train import TrainingStopped, train
from bench.resolve import check_recorded
from bench.studies.recipes import Recipe


def status(config: RunConfig) -> str:
    """ "done" (summary written, diverged runs included), "interrupted" (checkpoints, no summary) or "pending";
    ConfigError for a run made with variant settings this version resolves otherwise."""
    directory = config.run_dir()
    check_recorded(config)
    if (directory / "summary.json").is_file():
        return "done"
    if (directory / "checkpoints").is_dir() and any((directory / "checkpoints").glob("step_*")):
        return "interrupted"
    return "pending"


def execution_order(configs: list[RunConfig]) -> list[RunConfig]:
    """The runs seed by seed: a configuration's n-th seed after every configuration's (n-1)-th,
    otherwise in the given order."""
    rank, seen = [], Counter()
    for config in configs:
        settings = dataclasses.replace(config, seed=0).run_id()
        rank.append(seen[settings])
        seen[settings] += 1
    return [config for _, config in sorted(zip(rank, configs), key=lambda pair: pair[0])]


#: fields every command spells on its own (run_argv), never as a ``--set``
_SPELLED_APART = ("output_dir", "data_dir", "hyperparameters")


def run_argv(recipe: Recipe, sets: list[str], config: RunConfig) -> list[str]:
    """The ``launch.py`` arguments of one run of the recipe (what a sequential sweep trains): the recipe,
    the scalar ``--set`` overrides, the run's value of each of the recipe's grid axes and of every setting in
    which it differs from the recipe with those set (a tuning's grid point, validation fold, trial length),
    its folder and ``--resume auto``."""
    scalar_sets = [s for s in sets if not s.partition("=")[2].lstrip().startswith("[")]
    data = [f"data_dir={config.data_dir}"] if config.data_dir else []  # spelled apart, as --data_dir
    # the grid's axes (and the optimizer where it is not one: its [optimizers] settings come with it), and epochs
    # where [equal_passes] makes two runs of one grid point
    pinned = [*recipe.grid, *([] if "optimizer" in recipe.grid else ["optimizer"])]
    axes = [*pinned, *(["epochs"] if recipe.equal_passes else [])]
    chosen = [_assignment(config, key) for key in axes]
    reference = recipe.runs([*scalar_sets, *data, *chosen[: len(pinned)]], equal_passes=False)[0]
    chosen += [
        _assignment(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in (*_SPELLED_APART, *axes) and getattr(config, f.name) != getattr(reference, f.name)
    ]
    missing = object()
    chosen += [
        _assignment(config, key)
        for key, value in config.hyperparameters.items()
        if reference.hyperparameters.get(key, missing) != value
    ]
    unset = set(reference.hyperparameters) - set(config.hyperparameters)
    spelled = recipe.runs([*scalar_sets, *data, *chosen])
    if unset or len(spelled) != 1 or spelled[0].run_id() != config.run_id():  # a run no command line of this recipe makes
        raise ValueError(f"run {config.run_id()} cannot be spelled as recipe {recipe.name} with --set overrides")
    argv = ["--recipe", str(recipe.path)]
    for item in [*scalar_sets, *chosen]:
        argv += ["--set", item]
    argv += ["--output_dir", config.output_dir, "--resume", "auto"]
    if config.data_dir:
        argv += ["--data_dir", config.data_dir]
    return argv


def _assignment(config: RunConfig, key: str) -> str:
    value = getattr(config, key) if key in config.__dataclass_fields__ else config.hyperparameters[key]
    return f"{key}={_toml(value)}"


def commands(recipe: Recipe, sets: list[str], configs: list[RunConfig]) -> list[str]:
    """One `accelerate launch` command per run that is not done, in ``execution_order`` (see run_argv)."""
    return [
        shlex.join(["accelerate", "launch", "launch.py", *run_argv(recipe, sets, config)])
        for config in execution_order(configs)
        if status(config) != "done"
    ]


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return repr(value)


def _outcome(summary: dict) -> str:
    score = " ".join(
        f"{k.removeprefix('final_')} {summary[k]:.4f}" for k in ("final_val_acc", "final_test_acc") if summary.get(k) is not None
    )
    return f"{summary.get('status', '?')}, {score}" if score else summary.get("status", "?")


def run_sweep(recipe: Recipe, configs: list[RunConfig], progress=None, label: str | None = None) -> list[Path]:
    """Train every configuration not yet done, one at a time; one line per run with the time left."""
    label = label or f"sweep {recipe.name}"
    overall = progress.add_task(label, total=len(configs)) if progress else None
    start, trained = time.perf_counter(), 0
    pending = sum(status(c) != "done" for c in configs)
    for i, config in enumerate(execution_order(configs), 1):
        if status(config) != "done":
            try:
                summary = train(config, progress=progress, resume=True).summary
            except TrainingStopped as err:  # a diverged run is a result too; its files are written
                summary = {"status": "diverged"}
                if progress:
                    progress.print(f"note: {err}")
            trained += 1
            elapsed = time.perf_counter() - start
            if progress:
                left = elapsed / trained * (pending - trained)
                progress.print(
                    f"[{i}/{len(configs)}] {config.run_dir().name}: {_outcome(summary)}; "
                    f"{elapsed:.0f} s elapsed, about {left:.0f} s left"
                )
        if overall is not None:
            progress.advance(overall)
    return [c.run_dir() for c in configs]
