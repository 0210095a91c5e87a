"""What data a run read, as part of its identity: a fingerprint of the files under ``--data_dir``.

Two folders holding different data never give a run the same id, so a sweep on a second folder never
mistakes the first folder's finished runs for its own. The fingerprint hashes every visible file's
path (relative to the folder) and size, sorted, symbolic links followed, and the bytes of the text files
that hold labels and class lists (``.txt``, ``.csv``, ``.tsv``, ``.json``, ``.jsonl``: Tiny-ImageNet's
``val_annotations.txt`` and ``wnids.txt``): cheap (no image is read, one ``stat`` each) and unchanged by
moving or copying the folder. It is computed once per folder and process (a folder without files again
each time). It covers the whole folder: a file added beside the dataset changes it, and so the ids of the
runs on that folder (a new run, never a wrong one); an image file of one size and other bytes does not.

No fingerprint (``None``) where the data is fixed by its name: the embedded digits, a Hub dataset
(streamed by name), and the download that ``./data`` receives (torchvision and the Hub check what they
fetch). A run that downloads into an empty ``--data_dir`` is named after the files it downloaded
(:func:`awaits_download`), the fingerprint the same command finds from then on.
"""

from __future__ import annotations

import hashlib
import os

from bench.data.names import DataError

#: Files read whole: labels and class lists live in them, and they are small.
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl")


def _visible_files(root: str, legacy: bool = False) -> list[tuple[str, str]]:
    """(path relative to root, what identifies the file: its size, or its bytes' hash for a text file), sorted;
    ``legacy``: every file by its size, as the fingerprints recorded before text files were read."""
    found = []
    for folder, dirs, files in os.walk(root, onerror=_raise, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), _identity(path, legacy)))
    return sorted(found)


def _identity(path: str, legacy: bool = False) -> str:
    try:
        if path.lower().endswith(TEXT_SUFFIXES) and not legacy:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
        return str(os.stat(path).st_size)
    except OSError as err:  # a broken link, a file that went away or cannot be read
        _raise(err)


def _raise(err: OSError) -> None:
    raise DataError(f"cannot read {err.filename} ({err.strerror or err})")


_FOUND: dict[tuple[str, bool], str] = {}  # each folder's fingerprint, once found in this process


def folder_fingerprint(root: str, legacy: bool = False) -> str | None:
    """The folder's fingerprint, found once per process; None for a folder without files, which is looked at
    again each time (a download may fill it: see :func:`awaits_download`)."""
    found = _FOUND.get((root, legacy))
    if found is None:
        files = _visible_files(root, legacy)
        if not files:
            return None
        digest = hashlib.sha256("".join(f"{path}\t{identity}\n" for path, identity in files).encode())
        found = _FOUND[root, legacy] = digest.hexdigest()[:16]
    return found


def forget_fingerprints() -> None:
    """Find every folder's fingerprint anew (its files changed within this process)."""
    _FOUND.clear()


def _data_folder(dataset: str, data_dir: str | None) -> str | None:
    """The existing folder a run on ``dataset`` reads its files from, or None (a dataset fixed by its name, no
    ``data_dir``, or none there)."""
    if dataset == "digits" or dataset.startswith("hf:") or not data_dir:
        return None
    root = os.path.realpath(os.path.expanduser(data_dir))
    return root if os.path.isdir(root) else None


def data_fingerprint(dataset: str, data_dir: str | None, legacy: bool = False) -> str | None:
    """The fingerprint of the files a run on ``dataset`` reads from ``data_dir`` (None: see the module);
    ``legacy``: as recorded before text files were read (paths and sizes only), to recognise those runs."""
    root = _data_folder(dataset, data_dir)
    return folder_fingerprint(root, legacy) if root is not None else None


def awaits_download(dataset: str, data_dir: str | None) -> bool:
    """Whether ``data_dir`` is an existing folder with nothing visible in it, into which a run on ``dataset`` (one
    read from files, not the digits or a Hub dataset) would download its data."""
    root = _data_folder(dataset, data_dir)
    return root is not None and all(name.startswith(".") for name in os.listdir(root))
