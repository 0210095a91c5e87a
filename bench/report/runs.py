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
from bench.config import OPERATIONAL, RUN_METADATA, RunConfig, added_later_and_unset
from bench.errors import UserError
from bench.io import read_json
from bench.report.records import COLUMNS, STATUSES, RecordsError
from bench.report.records import is_records_file as records_file
from bench.report.records import read as records_read
from optimizers import available_optimizers

GROUP = ["dataset", "arch", "optimizer"]
SHARPNESS = {"hessian_max_eigenvalue": "λ_max", "sam_sharpness": "SAM sharpness", "hessian_trace": "Hessian trace"}
#: what a run's sharpness.json gives its record: the measures, and how far power iteration was from converged
SHARPNESS_RECORDED = (*SHARPNESS, "hessian_eigenvalue_residual")
#: config.json fields that differ between the seeds of one configuration (left out of its settings), with
#: bench.config.RUN_METADATA where that exists
PER_RUN = ("seed", "run_id", "world_size", "device", "versions", "environment")
#: summary.json numbers the table reads: required keys, and optional ones (a null or absent value shows blank)
SUMMARY_NUMBERS = ("final_test_acc", "best_test_acc", "train_time_s")
SUMMARY_OPTIONAL = ("final_test_loss", "final_test_ece", "passes_per_step", "images_per_s", "step_time_s")
#: summary.json values a per-run record keeps as they are
SUMMARY_EXTRA = ("final_val_acc", "final_train_loss", "num_classes", "sample_passes_per_step", "torch_threads", "world_size")


class ResultsError(UserError, ValueError):
    """Nothing to tabulate: one line naming the path and the problem."""


class RunSkipped(UserWarning):
    """A run directory left out of a table because one of its files is malformed."""


# ----------------------------------------------------------------------------- finding and reading runs


def settings_key(identity: dict, drop: tuple[str, ...] = ()) -> str:
    """The settings of an identity as one sortable string, less the fields in ``drop``."""
    kept = {k: v for k, v in identity.items() if k not in drop and not added_later_and_unset(k, v)}
    return json.dumps(kept, sort_keys=True, default=str)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Finished run directories (those holding summary.json) under the given paths, for the commands that
    need finished runs (sharpness, reproduction); tables use find_run_dirs. ResultsError for a path that
    does not exist, or when none of the paths holds a finished run."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ResultsError(f"no such folder: {path}")
        if (path / "summary.json").is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("summary.json")))
    if not found:
        raise ResultsError(f"no finished run (a folder with summary.json) under {', '.join(map(str, paths))}")
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
    wrong = [k for k in SHARPNESS_RECORDED if sharpness.get(k) is not None and not is_number(sharpness[k])]
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
    """What makes a run's result: config.json (missing fields at RunConfig's defaults) less OPERATIONAL and PER_RUN,
    and less the settings added later at their unset values (``bench.config.LATER_SETTINGS``)."""
    left_out = {*OPERATIONAL, *PER_RUN, *RUN_METADATA}
    defaults = json.loads(json.dumps(RunConfig().to_dict(), default=str))
    # as in the run's id: a setting added later, at its unset value, is left out (no fingerprint: embedded or
    # downloaded data, or an older run)
    return {k: v for k, v in {**defaults, **config}.items() if k not in left_out and not added_later_and_unset(k, v)}


def _record(run: Path) -> tuple[dict | None, list[str]]:
    """A run directory's per-run record (``bench.report.records.COLUMNS``) and notes; None (and the
    note) when the run is skipped."""
    config, problem = _read_checked(run / "config.json", _config_problem)
    if problem:
        return None, [f"{problem}; run skipped"]
    machine, code = config.get("environment") or {}, config.get("code") or {}
    record: dict[str, Any] = {
        **{k: config[k] for k in GROUP},
        "run_id": config.get("run_id", run.name),
        "seed": config.get("seed"),
        "status": "unfinished",
        "contended": False,
        "oversubscribed": False,
        "commit": code.get("commit"),
        # not the code of one commit: a modified tree, or other code continued the run (config.json's code_resumed)
        "dirty": True if config.get("code_resumed") else code.get("dirty"),
        "processor": machine.get("processor"),
        "gpu": machine.get("gpu"),
        "versions": {k: machine.get(k) for k in ("python", "torch", "accelerate", "numpy")} | {"project": code.get("version")},
        "settings": _identity(config),
        "variant_settings": config.get("resolved_hyperparameters"),
    }
    if (run / "summary.json").exists():
        summary, problem = _read_checked(run / "summary.json", _summary_problem)
        if problem:
            return None, [f"{problem}; run skipped"]
        record.update({k: summary.get(k) for k in SUMMARY_EXTRA})
        record["status"] = summary["status"]
        # recomputed from the recorded loads, so runs written under an older rule are judged by this one
        own = environment.own_threads(summary.get("torch_threads"), summary.get("world_size"))
        loads = (summary.get("load_at_start"), summary.get("load_at_end"))
        record["contended"] = summary.get("contended") is True or environment.contended(loads, own, machine.get("cpu_count"))
        record["oversubscribed"] = environment.oversubscribed(loads, machine.get("cpu_count"))
        record.update({k: math.nan if summary.get(k) is None else float(summary[k]) for k in SUMMARY_NUMBERS + SUMMARY_OPTIONAL})
    notes = []
    if (run / "sharpness.json").exists():
        sharpness, problem = _read_checked(run / "sharpness.json", _sharpness_problem)
        if problem:
            notes.append(f"{problem}; sharpness left out")
        else:
            record.update({k: sharpness.get(k) for k in SHARPNESS_RECORDED})
    return record, notes


def _row(record: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """A table's input row: the record (missing numbers as NaN) and what the tables derive from it."""
    row = {
        name: math.nan if kind == "number" and record.get(name) is None else record.get(name) for name, kind in COLUMNS.items()
    }
    identity = record["settings"]
    row.update(
        identity=identity,
        settings_key=settings_key(identity),
        label_noise=identity.get("label_noise", 0.0),
        # what a step time depends on (operational, so not part of the settings)
        timing=None if record["status"] == "unfinished" else (record.get("torch_threads"), record.get("world_size")),
        run_dir=run_dir,
    )
    return row


def read_records(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The per-run records under ``paths`` (run folders, or per-run files ``*_runs.csv``), where each
    came from, and one note per skipped run or file.  ResultsError when there is no run or none is readable."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ResultsError("no run directories given")
    records, origins, notes = [], [], []
    for path in paths:
        if records_file(path):
            try:
                found = records_read(path)
            except RecordsError as err:
                raise ResultsError(str(err)) from None
            records += found
            origins += [str(path)] * len(found)
    folders = [p for p in paths if not records_file(p)]
    for run in find_run_dirs(folders) if folders else ():
        record, run_notes = _record(run)
        notes += run_notes
        if record is not None:
            records.append(record)
            origins.append(str(run))
    if not records:
        raise ResultsError(f"no readable run: {'; '.join(notes)}")
    first: dict[str, str] = {}
    for record, origin in zip(records, origins):  # a run given twice (two copies, or one file twice) would count twice
        if record["run_id"] in first:
            raise ResultsError(f"run {record['run_id']} is given twice ({first[record['run_id']]}, {origin}): give each run once")
        first[record["run_id"]] = origin
    return records, origins, notes


def read_runs(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """One row per readable run under ``paths`` (run folders or per-run files; unfinished runs with
    status "unfinished"), and one note per skipped run or file naming it.  ResultsError when there is
    no run or none is readable."""
    records, origins, notes = read_records(paths)
    return runs_frame(records, origins), notes


def runs_frame(records: list[dict[str, Any]], origins: list[str]) -> pd.DataFrame:
    """The tables' input: one row per record (``origins``: where each came from), the records kept in
    ``.attrs["records"]`` (what a per-run file holds)."""
    runs = pd.DataFrame([_row(record, origin) for record, origin in zip(records, origins)])
    runs.attrs["records"] = records
    return runs


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """As read_runs, emitting each note as a RunSkipped warning; the notes are also in ``.attrs["notes"]``,
    the per-run records in ``.attrs["records"]``."""
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
