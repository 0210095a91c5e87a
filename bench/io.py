"""Run files: written atomically (temporary file, then rename) so a crash never leaves half a file,
with the permissions of any file the user writes (their umask), not mkstemp's 0600."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.errors import UserError


class WriteError(UserError, OSError):
    """A file that cannot be written where asked: one line naming it and why (an OSError still, for the
    callers that fall back, such as a cache)."""


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """``path`` if a file can be written there (its folder exists and is writable, or can be made); else one line.

    Checked before any work, so that a long command does not fail at its last step."""
    path = Path(path)
    if not path.name or path.is_dir():
        raise WriteError(f"{what} {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise WriteError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(f"{what} {path} cannot be written: {parent} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto it if the block succeeds, removed if not."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise WriteError(f"cannot write {path} ({_reason(err)})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise WriteError(f"cannot write {path} ({_reason(err)})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in rows))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
