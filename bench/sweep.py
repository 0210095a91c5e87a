"""Sweeps: run every configuration of a recipe, skipping finished runs and resuming
interrupted ones, then write its tables and plots from the run files.

Run directories are named by their configuration's id, so a sweep can be stopped and
started again, run piecewise on several machines (``--print_commands``) into one
results directory, and it never runs, loses or counts a configuration twice.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .config import RunConfig
from .recipes import Recipe


def run_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / (config.run_name or config.run_id())


def status(config: RunConfig) -> str:
    """"done" (summary written, diverged runs included), "interrupted" (checkpoints, no summary) or "pending"."""
    directory = run_dir(config)
    if (directory / "summary.json").is_file():
        return "done"
    if (directory / "checkpoints").is_dir() and any((directory / "checkpoints").glob("step_*")):
        return "interrupted"
    return "pending"


def commands(recipe: Recipe, sets: list[str], configs: list[RunConfig]) -> list[str]:
    """One `accelerate launch` command per run that is not done."""
    lines = []
    for config in configs:
        if status(config) == "done":
            continue
        chosen = [f"{key}={_toml(getattr(config, key, None) if key in config.__dataclass_fields__ else config.hyperparameters[key])}"
                  for key in recipe.grid]
        scalar_sets = [s for s in sets if not s.partition("=")[2].lstrip().startswith("[")]
        argv = ["accelerate", "launch", "launch.py", "--recipe", str(recipe.path)]
        for item in [*scalar_sets, *chosen]:
            argv += ["--set", item]
        argv += ["--output_dir", config.output_dir, "--resume", "auto"]
        if config.data_dir:
            argv += ["--data_dir", config.data_dir]
        lines.append(shlex.join(argv))
    return lines


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return repr(value)


def run_sweep(recipe: Recipe, configs: list[RunConfig], progress=None) -> list[Path]:
    from .train import TrainingStopped, train

    overall = progress.add_task(f"sweep {recipe.name}", total=len(configs)) if progress else None
    for config in configs:
        if status(config) != "done":
            try:
                train(config, progress=progress, resume=True)
            except TrainingStopped as err:  # a diverged run is a result too; its files are written
                print(f"note: {err}")
        if overall is not None:
            progress.advance(overall)
    return [run_dir(c) for c in configs]
