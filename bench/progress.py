"""Progress: rich bars on a terminal, plain lines when the output goes to a file (CI, clusters, nohup).

Both offer the subset of ``rich.progress.Progress`` the harness uses: ``add_task``,
``advance``, ``remove_task`` and ``print``, and both are context managers.
"""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class PlainProgress:
    """No bars: only the lines the harness prints (one per finished run, one per long epoch), flushed at once."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._tasks = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.stream.flush()

    def add_task(self, description: str, total: float | None = None, completed: float = 0) -> int:
        self._tasks += 1
        return self._tasks

    def advance(self, task: int, advance: float = 1) -> None:
        pass

    def remove_task(self, task: int) -> None:
        pass

    def print(self, *objects) -> None:
        print(time.strftime("%H:%M:%S"), *objects, file=self.stream, flush=True)


def progress(stream=None):
    """A rich progress display on a terminal, plain lines elsewhere."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return PlainProgress(stream)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()
    )
