"""Finding a dataset's files under a data folder, and the download policy: a download starts only into
``./data`` or an existing empty folder; anything else found is reported, never downloaded over."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.data.datasets import DatasetInfo, short_error
from bench.data.names import DataError

# --------------------------------------------------------------------------- finding and downloading


@dataclass(frozen=True)
class Root:
    path: str  # absolute
    given: bool  # named by the user (data_dir), as opposed to the default ./data


@dataclass
class Findings:
    """What a search turned up besides a usable copy."""

    broken: list[str] = field(default_factory=list)  # a copy of this dataset that cannot be used
    other: list[str] = field(default_factory=list)  # files of some other dataset or format


def scan(folder: str) -> list[os.DirEntry]:
    """The entries of ``folder``; a DataError naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as exc:
        raise DataError(f"cannot list {folder} ({short_error(exc)})") from None


def visible_entries(folder: str) -> list[str]:
    """Sorted names in ``folder``, folders with a trailing ``/``, hidden entries left out."""
    return sorted(e.name + ("/" if e.is_dir() else "") for e in scan(folder) if not e.name.startswith("."))


def describe_entries(entries: Sequence[str], show: int = 5) -> str:
    """``"3 files (a.txt, b.txt, c.txt)"``, ``"2 files and 1 folder (a, b, sub/)"``."""
    n_dirs = sum(e.endswith("/") for e in entries)
    n_files = len(entries) - n_dirs
    parts = [f"{n} {word}{'s' if n != 1 else ''}" for n, word in ((n_files, "file"), (n_dirs, "folder")) if n]
    names = ", ".join(entries[:show]) + (", ..." if len(entries) > show else "")
    return f"{' and '.join(parts)} ({names})"


def find_archives(dirs: Sequence[str], archive: str, folder: str, found: Findings) -> None:
    """An archive lying in a searched folder without its extracted ``folder`` is a broken copy."""
    for d in dirs:
        path = os.path.join(d, archive)
        if os.path.isfile(path) and not os.path.isdir(os.path.join(d, folder)):
            found.broken.append(
                f"{path} was never extracted (an interrupted download?); extract it into {d} or delete it to download again"
            )


@dataclass(frozen=True)
class Wanted:
    """How a loader words a missing dataset."""

    what: str  # "cifar-10-batches-py/ or train*.parquet + test*.parquet"
    where: str  # " in X or X/cifar10 (also under plain_text/ or data/)"
    howto: str  # "get it with `...` or `...`"


def download_allowed(info: DatasetInfo, root: Root, download: bool, found: Findings, wanted: Wanted) -> str:
    """Raise the :class:`DataError` for a dataset that is not in ``root``, unless a download may start.

    Returns what was found in ``root``, for the message should the download fail. The
    rule (module docstring): never over a broken copy; only with ``download`` on; only
    into the default ``./data`` or into an existing empty ``data_dir``.
    """
    name, path, howto = info.display_name, root.path, wanted.howto
    if found.broken:
        more = f" (and {len(found.broken) - 1} more)" if len(found.broken) > 1 else ""
        raise DataError(f"{name}: {found.broken[0]}{more}; nothing was downloaded")
    if root.given and not os.path.exists(path):
        raise DataError(
            f"data_dir {path} does not exist (nothing was created or downloaded); "
            f"to download {name}, create it empty (or give no data_dir, for ./data), or {howto}"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"data_dir {path} is not a folder; {howto}")
    entries = visible_entries(path) if os.path.isdir(path) else []
    if not os.path.isdir(path):
        state = f"{path} (the default data_dir) does not exist"
    elif not entries:
        state = f"{path} is empty (expected {wanted.what})"
    else:
        state = f"{path} holds {describe_entries(entries)} but no {wanted.what}{wanted.where}"
    state += "".join(f"; {note}" for note in found.other)
    if not download:
        raise DataError(f"{name} not found: {state}; download is off; {howto}")
    if root.given and entries:
        raise DataError(
            f"{name} not found: {state}; nothing was downloaded: a download only goes into an empty data_dir "
            f"(or into ./data when no data_dir is given); {howto}"
        )
    return state


def dedupe(paths: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for p in paths:
        p = os.path.normpath(p)
        if p not in seen:
            seen.append(p)
    return seen
