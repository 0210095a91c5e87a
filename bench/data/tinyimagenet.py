"""Tiny-ImageNet: the original ``tiny-imagenet-200`` folder or the Hub parquet files of ``zh-plus/tiny-imagenet``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from bench.data.cache import cached
from bench.data.datasets import DatasetInfo, check_labels, short_error
from bench.data.names import DataError
from bench.data.parquet import decode_hf_split, decode_images, find_parquet, load_parquet_splits, quiet_datasets
from bench.data.sources import Findings, Root, Wanted, dedupe, download_allowed, find_archives, scan

# --------------------------------------------------------------------------- Tiny-ImageNet

_TINY_HUB = "zh-plus/tiny-imagenet"
_TINY_FOLDER = "tiny-imagenet-200"


def _tiny_dirs(root: str) -> list[str]:
    return dedupe(
        [
            root,
            os.path.join(root, _TINY_FOLDER),
            os.path.join(root, "tinyimagenet"),
            os.path.join(root, "tinyimagenet", _TINY_FOLDER),
            os.path.join(root, "tiny-imagenet"),
        ]
    )


def _find_tiny_folder(dirs: Sequence[str], found: Findings) -> str | None:
    """The first complete ``tiny-imagenet-200`` folder (train/ and val/val_annotations.txt).

    A folder named ``tiny-imagenet-200`` or holding ``wnids.txt`` without both is a broken copy.
    """
    for d in dirs:
        ann = os.path.join(d, "val", "val_annotations.txt")
        if os.path.isdir(os.path.join(d, "train")) and os.path.isfile(ann):
            return d
        if os.path.isdir(d) and (os.path.basename(d) == _TINY_FOLDER or os.path.isfile(os.path.join(d, "wnids.txt"))):
            missing = [m for m, ok in (("train/", os.path.isdir(os.path.join(d, "train"))), (ann, os.path.isfile(ann))) if not ok]
            found.broken.append(f"{d} is incomplete (no {' and no '.join(missing)}); delete it to download again")
    return None


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, ValueError) as exc:
        raise DataError(f"Tiny-ImageNet: cannot read {path} ({short_error(exc)})") from None


def _tiny_classes(folder: str) -> list[str]:
    """The sorted class ids: ``wnids.txt``, or else the class folders under ``train/``."""
    wnids_file = os.path.join(folder, "wnids.txt")
    train_dir = os.path.join(folder, "train")
    if os.path.isfile(wnids_file):
        wnids = sorted({line.strip() for line in _read_lines(wnids_file) if line.strip()})
    else:
        wnids = sorted(e.name for e in scan(train_dir) if e.is_dir())
    if not wnids:
        raise DataError(f"Tiny-ImageNet: no classes in {wnids_file} or {train_dir}")
    return wnids


def _tiny_train_files(folder: str, wnids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    for i, w in enumerate(wnids):
        img_dir = os.path.join(folder, "train", w, "images")
        if not os.path.isdir(img_dir):
            raise DataError(f"Tiny-ImageNet: class folder {img_dir} is missing")
        names = sorted(e.name for e in scan(img_dir) if e.is_file() and not e.name.startswith("."))
        if not names:
            raise DataError(f"Tiny-ImageNet: class folder {img_dir} holds no images")
        files += [os.path.join(img_dir, n) for n in names]
        labels += [i] * len(names)
    return files, np.asarray(labels, np.int64)


def _annotations(folder: str) -> str:
    return os.path.join(folder, "val", "val_annotations.txt")


def _tiny_val_files(folder: str, wnids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The labelled ``val/`` split (our test split), sorted by file name."""
    index = {w: i for i, w in enumerate(wnids)}
    ann = _annotations(folder)
    files, labels = [], []
    for lineno, line in enumerate(_read_lines(ann), 1):
        parts = line.strip().split("\t")
        if len(parts) < 2:
            if line.strip():
                raise DataError(f"{ann}:{lineno}: expected 'file<TAB>wnid...', got {line.strip()!r}")
            continue
        if parts[1] not in index:
            raise DataError(f"{ann}:{lineno}: class {parts[1]!r} is not in wnids.txt")
        files.append(os.path.join(folder, "val", "images", parts[0]))
        labels.append(index[parts[1]])
    if not files:
        raise DataError(f"Tiny-ImageNet: {ann} lists no images")
    order = np.argsort(np.array(files, dtype=object), kind="stable")
    files = [files[i] for i in order]
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"Tiny-ImageNet: {p} (listed in {ann}) is missing")
    return files, np.asarray([labels[i] for i in order], np.int64)


def _tiny_folder_files(folder: str):
    wnids = _tiny_classes(folder)
    return _tiny_train_files(folder, wnids), _tiny_val_files(folder, wnids)


def _load_tiny_folder(info: DatasetInfo, folder: str, cache_dir: str):
    (trf, trl), (tef, tel) = _tiny_folder_files(folder)
    check_labels(trl, len(trf), info.num_classes, folder)

    def build():
        tr = decode_images(trf, info.image_size, info.channels, f"Tiny-ImageNet train ({folder})")
        te = decode_images(tef, info.image_size, info.channels, f"Tiny-ImageNet val ({folder})")
        return (tr, trl), (te, tel)

    # the labels come from the class list and the annotation file: a change to either is a new cache entry
    label_files = [f for f in (os.path.join(folder, "wnids.txt"), _annotations(folder)) if os.path.isfile(f)]
    return cached(info, cache_dir, label_files + trf + tef, build, extra="folder")


def _hf_download(repo_id: str):
    """``datasets.load_dataset(repo_id)`` (monkeypatched in tests)."""
    with quiet_datasets() as datasets:
        return datasets.load_dataset(repo_id)


def _load_tiny_hub(info: DatasetInfo, dd, cache_dir: str):
    """Decode the train/valid splits of a downloaded ``zh-plus/tiny-imagenet`` (through the cache)."""
    splits = {}
    for ours, theirs in (("train", "train"), ("test", "valid")):
        if theirs not in dd:
            raise DataError(f"{_TINY_HUB}: expected splits train/valid, got {sorted(dd)}")
        splits[ours] = dd[theirs]
    sources = sorted({f["filename"] for s in splits.values() for f in s.cache_files})

    def build():
        return tuple(decode_hf_split(splits[s], "image", "label", info, f"{_TINY_HUB} {s}", None) for s in ("train", "test"))

    if not sources:  # in-memory dataset: nothing to key a cache on
        return build()
    return cached(info, cache_dir, sources, build, extra="hub")


def load_tinyimagenet(info: DatasetInfo, root: Root, download: bool, cache_dir: str):
    dirs = _tiny_dirs(root.path)
    found = Findings()
    folder = _find_tiny_folder(dirs, found)
    if folder is not None:
        return _load_tiny_folder(info, folder, cache_dir)
    files = find_parquet(dirs, ["data", ""], ("train-*.parquet", "valid-*.parquet"), {"image", "label"}, found)
    if files is not None:
        return load_parquet_splits(info, files, "image", "label", cache_dir)
    find_archives([root.path], f"{_TINY_FOLDER}.zip", _TINY_FOLDER, found)

    wanted = Wanted(
        what=f"{_TINY_FOLDER}/ (train/, val/val_annotations.txt) or data/train-*.parquet + data/valid-*.parquet",
        where=f" in {' or '.join(dirs[:2])}",
        howto=(
            f"get it with `huggingface-cli download {_TINY_HUB} --repo-type dataset --local-dir {root.path}` "
            f"or unzip http://cs231n.stanford.edu/{_TINY_FOLDER}.zip into {root.path}"
        ),
    )
    state = download_allowed(info, root, download, found, wanted)
    try:
        dd = _hf_download(_TINY_HUB)
    except Exception as exc:
        raise DataError(
            f"{info.display_name} not found: {state}; downloading {_TINY_HUB} failed ({short_error(exc)}); {wanted.howto}"
        ) from None
    return _load_tiny_hub(info, dd, cache_dir)
