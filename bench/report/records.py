"""Per-run records: one row per run holding everything a table or a claim reads from it.

``table`` writes them beside each table as ``NAME_runs.csv``; ``table`` and ``claims`` read such a file
wherever they read a folder of runs, so the analysis can be redone, byte for byte, without the run
folders (which hold checkpoints and models and are not committed).

Every cell is written so that it reads back exactly: numbers as Python's shortest round-trip text,
booleans as ``true``/``false``, missing values blank, nested values (the run's settings, the
variant's resolved settings, library versions) as JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

#: column -> kind ("text", "number", "int", "bool", "json"); the order is the file's
COLUMNS: dict[str, str] = {
    "run_id": "text",
    "dataset": "text",
    "arch": "text",
    "optimizer": "text",
    "seed": "int",
    "status": "text",
    "final_test_acc": "number",
    "best_test_acc": "number",
    "final_val_acc": "number",
    "final_test_loss": "number",
    "final_test_ece": "number",
    "final_train_loss": "number",
    "num_classes": "int",
    "hessian_max_eigenvalue": "number",
    "sam_sharpness": "number",
    "hessian_trace": "number",
    "hessian_eigenvalue_residual": "number",
    "step_time_s": "number",
    "train_time_s": "number",
    "passes_per_step": "number",
    "sample_passes_per_step": "number",
    "images_per_s": "number",
    "contended": "bool",
    "oversubscribed": "bool",
    "torch_threads": "int",
    "world_size": "int",
    "commit": "text",
    "dirty": "bool",
    "processor": "text",
    "gpu": "text",
    "versions": "json",
    "settings": "json",
    "variant_settings": "json",
}
#: columns added after per-run files were written: a file without them reads them as blank (not recorded)
ADDED_LATER = ("hessian_eigenvalue_residual",)
SUFFIX = "_runs.csv"
#: a run's status, as its summary (or its absence: unfinished) says
STATUSES = ("completed", "stopped_early", "diverged", "unfinished")
#: accuracies are fractions in [0, 1] (blank where not evaluated)
FRACTIONS = ("final_test_acc", "best_test_acc", "final_val_acc")


class RecordsError(ValueError):
    """A per-run file that cannot be read: one line naming it and the problem."""


def is_records_file(path: str | Path) -> bool:
    return str(path).endswith(SUFFIX)


def path_for(table_prefix: str | Path) -> Path:
    """``results/digits`` -> ``results/digits_runs.csv``."""
    prefix = Path(table_prefix)
    return prefix.with_name(prefix.name + SUFFIX)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value: Any, kind: str) -> str:
    if kind == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    if _missing(value):
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "number":
        return repr(float(value))
    if kind == "int":
        return str(int(value))
    return str(value)


def _value(text: str, kind: str, where: str) -> Any:
    try:
        if kind == "json":
            return json.loads(text)
        if text == "":
            return math.nan if kind == "number" else None
        if kind == "number":
            return float(text)
        if kind == "int":
            return int(text)
        if kind == "bool":
            if text not in ("true", "false"):
                raise ValueError(f"expected true or false, got {text!r}")
            return text == "true"
    except ValueError as err:
        raise RecordsError(f"{where}: {err}") from None
    return text


def to_csv(records: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for record in records:
        writer.writerow([_cell(record.get(name), kind) for name, kind in COLUMNS.items()])
    return out.getvalue()


def read(path: str | Path) -> list[dict[str, Any]]:
    """The records of one per-run file, each value of its column's kind; RecordsError names a bad file or cell."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecordsError(f"{path}: unreadable ({err.__class__.__name__}: {err})") from None
    rows = list(csv.reader(io.StringIO(text)))
    earlier = [name for name in COLUMNS if name not in ADDED_LATER]
    if not rows or rows[0] not in (list(COLUMNS), earlier):
        raise RecordsError(f"{path}: not a per-run file (its first line must name the columns {', '.join(COLUMNS)})")
    header = rows[0]
    records = []
    for line, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise RecordsError(f"{path}, line {line}: {len(row)} cells, expected {len(header)}")
        cells = dict(zip(header, row))
        record = {name: _value(cells.get(name, ""), kind, f"{path}, line {line}, {name}") for name, kind in COLUMNS.items()}
        _check(record, f"{path}, line {line}")
        records.append(record)
    if not records:
        raise RecordsError(f"{path}: no runs")
    seen: dict[str, int] = {}
    for line, record in enumerate(records, 2):
        if record["run_id"] in seen:
            raise RecordsError(f"{path}, line {line}: run {record['run_id']} again (first on line {seen[record['run_id']]})")
        seen[record["run_id"]] = line
    return records


def _check(record: dict[str, Any], where: str) -> None:
    """The values a table or a claim relies on, each in its range: one line naming the first that is not."""
    if not record["run_id"]:
        raise RecordsError(f"{where}, run_id: empty")
    if record["status"] not in STATUSES:
        raise RecordsError(f"{where}, status: {record['status']!r} is not one of {', '.join(STATUSES)}")
    if not isinstance(record["settings"], dict):
        raise RecordsError(f"{where}, settings: expected a JSON object, got {record['settings']!r}")
    for name in ("variant_settings", "versions"):
        if record[name] is not None and not isinstance(record[name], dict):
            raise RecordsError(f"{where}, {name}: expected a JSON object, got {record[name]!r}")
    for name in FRACTIONS:
        value = record[name]
        if not math.isnan(value) and not 0.0 <= value <= 1.0:
            raise RecordsError(f"{where}, {name}: {value!r} is not a fraction in [0, 1] (blank: not evaluated)")
