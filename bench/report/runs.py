"""Finding and reading run directories (config.json, summary.json, sharpness.json), checked; nothing is executed."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from bench import environment
from bench.config import OPERATIONAL, RUN_METADATA, RunConfig
from bench.errors import UserError
from bench.io import read_json
from optimizers import available_optimizers

GROUP = ["dataset", "arch", "optimizer"]
SHARPNESS = {"hessian_max_eigenvalue": "λ_max", "sam_sharpness": "SAM sharpness", "hessian_trace": "Hessian trace"}
#: config.json fields that differ between the seeds of one configuration (left out of its settings), with
#: bench.config.RUN_METADATA where that exists
PER_RUN = ("seed", "run_id", "world_size", "device", "versions", "environment")
STATUSES = ("completed", "stopped_early", "diverged", "unfinished")
#: summary.json numbers the table reads: required keys, and optional ones (a null or absent value shows blank)
SUMMARY_NUMBERS = ("final_test_acc", "best_test_acc", "train_time_s")
SUMMARY_OPTIONAL = ("final_test_loss", "final_test_ece", "passes_per_step", "images_per_s", "step_time_s")


class ResultsError(UserError, ValueError):
    """Nothing to tabulate: one line naming the path and the problem."""


class RunSkipped(UserWarning):
    """A run directory left out of a table because one of its files is malformed."""


# ----------------------------------------------------------------------------- finding and reading runs


def settings_key(identity: dict, drop: tuple[str, ...] = ()) -> str:
    """The settings of an identity as one sortable string, less the fields in ``drop``."""
    return json.dumps({k: v for k, v in identity.items() if k not in drop}, sort_keys=True, default=str)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Finished run directories (those holding summary.json) under the given paths; missing paths are
    ignored.  For commands that need finished runs (sharpness, reproduction); tables use find_run_dirs."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("summary.json")))
    return found


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory (one holding config.json, finished or not) under the given paths.

    Raises ResultsError for a path that does not exist, one that is not a folder, or a folder without runs."""
    found: dict[Path, Path] = {}
    paths = [Path(p) for p in paths]
    if not paths:
        raise ResultsError("no run directories given")
    for path in paths:
        if not path.exists():
            raise ResultsError(f"no such folder: {path}")
        if not path.is_dir():
            raise ResultsError(f"not a run directory: {path} (a run directory holds config.json)")
        runs = _walk_runs(path)
        if not runs:
            raise ResultsError(f"no runs under {path} (a run directory holds config.json)")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def _walk_runs(folder: Path) -> list[Path]:
    runs = []
    for root, dirs, files in os.walk(folder):
        if "config.json" in files:
            runs.append(Path(root))
            dirs.clear()  # a run's own subfolders (checkpoints) hold no runs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(runs)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_problem(config: Any) -> str | None:
    if not isinstance(config, dict):
        return f"expected a JSON object, got {type(config).__name__}"
    bad = [k for k in GROUP if not isinstance(config.get(k), str)]
    if bad:
        return f"missing or not text: {', '.join(bad)}"
    if not isinstance(config.get("hyperparameters", {}), dict):
        return "hyperparameters is not an object"
    return None


def _summary_problem(summary: Any) -> str | None:
    if not isinstance(summary, dict):
        return f"expected a JSON object, got {type(summary).__name__}"
    if summary.get("status") not in STATUSES[:3]:
        return f"status {summary.get('status')!r} is not one of {', '.join(STATUSES[:3])}"
    missing = [k for k in SUMMARY_NUMBERS if k not in summary]
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = [k for k in SUMMARY_NUMBERS + SUMMARY_OPTIONAL if summary.get(k) is not None and not is_number(summary[k])]
    return f"not a number: {', '.join(wrong)}" if wrong else None


def _sharpness_problem(sharpness: Any) -> str | None:
    if not isinstance(sharpness, dict):
        return f"expected a JSON object, got {type(sharpness).__name__}"
    wrong = [k for k in SHARPNESS if sharpness.get(k) is not None and not is_number(sharpness[k])]
    return f"not a number: {', '.join(wrong)}" if wrong else None


def _read_checked(path: Path, problem_of) -> tuple[Any, str | None]:
    """The JSON in ``path`` and None, or None and a note naming the file and what is wrong with it."""
    try:
        value = read_json(path)
    except json.JSONDecodeError as err:
        return None, f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{path}: unreadable ({err.__class__.__name__}: {err})"
    problem = problem_of(value)
    return (None, f"{path}: {problem}") if problem else (value, None)


def _identity(config: dict) -> dict:
    """What makes a run's result: config.json (missing fields at RunConfig's defaults) less OPERATIONAL and PER_RUN."""
    left_out = {*OPERATIONAL, *PER_RUN, *RUN_METADATA}
    defaults = json.loads(json.dumps(RunConfig().to_dict(), default=str))
    return {k: v for k, v in {**defaults, **config}.items() if k not in left_out}


def _read_run(run: Path) -> tuple[dict | None, list[str]]:
    """One table input row for a run directory and notes; None (and the note) when the run is skipped."""
    config, problem = _read_checked(run / "config.json", _config_problem)
    if problem:
        return None, [f"{problem}; run skipped"]
    row: dict[str, Any] = {
        "status": "unfinished",
        "contended": False,
        "oversubscribed": False,
        "timing": None,
        **{k: math.nan for k in SUMMARY_NUMBERS + SUMMARY_OPTIONAL},
    }
    if (run / "summary.json").exists():
        summary, problem = _read_checked(run / "summary.json", _summary_problem)
        if problem:
            return None, [f"{problem}; run skipped"]
        row.update(summary)
        row.update({k: math.nan if summary.get(k) is None else float(summary[k]) for k in SUMMARY_NUMBERS + SUMMARY_OPTIONAL})
        # recomputed from the recorded loads, so runs written under an older rule are judged by this one
        own = environment.own_threads(summary.get("torch_threads"), summary.get("world_size"))
        cores = (config.get("environment") or {}).get("cpu_count")
        loads = (summary.get("load_at_start"), summary.get("load_at_end"))
        row["contended"] = summary.get("contended") is True or environment.contended(loads, own, cores)
        row["oversubscribed"] = environment.oversubscribed(loads, cores)
        row["timing"] = (summary.get("torch_threads"), summary.get("world_size"))  # what a step time depends on
    notes = []
    if (run / "sharpness.json").exists():
        sharpness, problem = _read_checked(run / "sharpness.json", _sharpness_problem)
        if problem:
            notes.append(f"{problem}; sharpness left out")
        else:
            row.update({k: math.nan if sharpness.get(k) is None else float(sharpness[k]) for k in SHARPNESS})
    identity = _identity(config)
    row.update(
        {k: config[k] for k in GROUP},
        seed=config.get("seed"),
        label_noise=config.get("label_noise", 0.0),
        run_id=config.get("run_id", row.get("run_id", run.name)),
        run_dir=str(run),
        identity=identity,
        settings_key=settings_key(identity),
    )
    return row, notes


def read_runs(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """One row per readable run directory under ``paths`` (unfinished ones with status "unfinished"), and
    one note per skipped run or file naming it.  ResultsError when there is no run or none is readable."""
    rows, notes = [], []
    for run in find_run_dirs(paths):
        row, run_notes = _read_run(run)
        notes += run_notes
        if row is not None:
            rows.append(row)
    if not rows:
        raise ResultsError(f"no readable run: {'; '.join(notes)}")
    return pd.DataFrame(rows), notes


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """As read_runs, emitting each note as a RunSkipped warning; the notes are also in ``.attrs["notes"]``."""
    runs, notes = read_runs(paths)
    for note in notes:
        warnings.warn(note, RunSkipped, stacklevel=2)
    runs.attrs["notes"] = notes
    return runs


# ----------------------------------------------------------------------------- the comparison table


def optimizer_order(names: Iterable[str] | None = None) -> list[str]:
    """The one order of optimizers in tables and plot legends: the registry's (sgd first, then the variants
    as registered); names it does not know follow in first-appearance order.  With ``names``: those, distinct."""
    known = available_optimizers()
    if names is None:
        return known
    rank = {name: i for i, name in enumerate(known)}
    return sorted(dict.fromkeys(names), key=lambda name: rank.get(name, len(rank)))  # stable for unknown names
