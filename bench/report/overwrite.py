"""Written results are never replaced by smaller ones unless asked (``--force``).

A table, a claims report or a reproduction table is usually committed: a command run on the wrong
folder, on one new seed, or before the runs finished would otherwise silently replace it with one that
holds less. Each check compares what is about to be written with what is there and raises one line
naming what would be lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bench.errors import UserError
from bench.report import records


class WouldShrink(UserError):
    """Writing would replace a result with one that holds less; ``--force`` writes it anyway."""


def _names(items: list[str], show: int = 4) -> str:
    return ", ".join(items[:show]) + (f" and {len(items) - show} more" if len(items) > show else "")


def check_runs_kept(out_prefix: str | Path, run_ids: Iterable[str], force: bool) -> None:
    """The per-run file beside ``out_prefix`` lists no finished run that the new table leaves out."""
    path = records.path_for(out_prefix)
    if force or not path.is_file():
        return
    try:
        before = [r["run_id"] for r in records.read(path) if r["status"] != "unfinished"]
    except records.RecordsError:
        return  # not a per-run file of ours: nothing of ours to lose
    dropped = sorted(set(before) - set(run_ids))
    if dropped:
        raise WouldShrink(
            f"{path} holds {len(dropped)} finished run(s) the new table leaves out ({_names(dropped)}): "
            "give their folders too, or --force to replace it"
        )


def check_not_emptied(
    path: str | Path, kept: int, before: int, what: str, force: bool, check: str = "check the runs given"
) -> None:
    """``kept`` measured entries replacing ``before`` in an existing file: refused when fewer and not forced."""
    path = Path(path)
    if force or not path.is_file() or kept >= before:
        return
    raise WouldShrink(f"{path} holds {before} {what}, the new one {kept}: {check}, or --force to replace it")


def count_lines(path: str | Path, markers: tuple[str, ...]) -> int:
    """How many lines of an existing file (0 when there is none) hold one of ``markers``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return 0
    return sum(any(m in line for m in markers) for line in text.splitlines())


#: a measured row of a reproduction table, as written (bench.report.reproduction's statuses; "within": its earlier form)
#: (its status cell, then its command's: "failed" is also a column's name)
MEASURED = tuple(
    f"| {status} | python launch.py" for status in ("reproduced", "below", "above", "not resolved", "failed", "within")
)


def check_reproduction_kept(path: str | Path, table, force: bool) -> None:
    """A reproduction table replacing ``path`` keeps at least as many measured rows."""
    measured = int((table.status != "not run").sum()) if not table.empty else 0
    check_not_emptied(path, measured, count_lines(path, MEASURED), "measured rows", force)
