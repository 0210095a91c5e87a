"""Image classification datasets as whole uint8 tensors in memory.

``load_dataset_splits(name, data_dir)`` returns ``(train, test)`` as
:class:`ImageDataset` objects holding every image as one uint8 ``[N, C, H, W]``
tensor, ready for batch-wise augmentation (``bench.augment``) on any device.
``prepare_train_set`` then applies a run's training-set options (fixed subset,
held-out validation split, label noise) in one fixed order.

Supported datasets (names are case-insensitive, ``-``/``_`` ignored):

* ``digits``: scikit-learn's 8x8 digits, embedded, no download.
* ``cifar10`` / ``cifar100``: torchvision's pickled batches or the Hugging
  Face Hub parquet files (``uoft-cs/cifar10`` / ``uoft-cs/cifar100``).
* ``tinyimagenet``: the original ``tiny-imagenet-200`` folder or the Hub
  parquet files of ``zh-plus/tiny-imagenet``.

Finding and downloading (every dataset but ``digits``). The data is looked for
in ``data_dir`` (default ``./data``) and in ``data_dir/<name>``, plus the
sub-folders each format names. Then:

1. A readable copy is loaded. A copy that is there but broken (a
   ``cifar-10-batches-py/`` missing a batch, a truncated pickle or parquet
   file, parquet files with only the train split, an archive never
   extracted) raises :class:`DataError` naming the file and what is wrong; it
   is never downloaded over.
2. Otherwise a download starts only if ``download`` is on and either no
   ``data_dir`` was given (the default ``./data``, created by the download as
   torchvision does) or the given ``data_dir`` is an existing, empty folder
   (hidden entries such as ``.DS_Store`` aside). Anything else raises
   :class:`DataError` saying what was found: ``data_dir X does not exist``,
   ``X is empty`` (download off) or ``X holds 3 files (a.txt, ...) but no
   cifar-10-batches-py/ or train*.parquet ...``. Nothing is created in
   ``data_dir`` unless a download starts. CIFAR downloads (torchvision) go
   into ``data_dir``; Tiny-ImageNet downloads go to the Hugging Face cache.

Parquet files with other columns than the dataset's are reported (file,
columns found, columns expected); under a folder named for the dataset they
count as a broken copy, elsewhere (``data_dir`` itself, ``data_dir/data``,
which may hold another dataset) as something else that is there.

Images that must be decoded (parquet, JPEG folders) are decoded once and the
result is cached as a safetensors file under ``cache_dir`` (default
``$SAM_BENCH_CACHE`` or ``~/.cache/sam-bench``), keyed by the paths, sizes and
modification times of the source files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path

__all__ = [
    "DataError",
    "DatasetInfo",
    "ImageDataset",
    "PreparedData",
    "DATASET_INFO",
    "available_datasets",
    "canonical_name",
    "get_dataset_info",
    "default_cache_dir",
    "load_dataset_splits",
    "prepare_train_set",
    "training_subset",
    "with_label_noise",
]

_CACHE_FORMAT = 1  # bump to invalidate every cache file


class DataError(Exception):
    """A user-facing data problem. The message is a single line saying what was
    looked for, where, and how to get it."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, and its default augmentation (``bench.augment.default_augmentation``)."""

    name: str
    display_name: str
    num_classes: int
    image_size: int  # height == width
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # default random-crop padding
    flip: bool  # default random horizontal flip
    cutout_size: int  # cutout side used when cutout is asked for


DATASET_INFO: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10",
        display_name="CIFAR-10",
        num_classes=10,
        image_size=32,
        channels=3,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_padding=4,
        flip=True,
        cutout_size=16,
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        display_name="CIFAR-100",
        num_classes=100,
        image_size=32,
        channels=3,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        crop_padding=4,
        flip=True,
        cutout_size=16,
    ),
    "digits": DatasetInfo(
        name="digits",
        display_name="Digits (scikit-learn 8x8)",
        num_classes=10,
        image_size=8,
        channels=1,
        # computed from the 1,437-image train split (pixels / 255, population std)
        mean=(0.3054,),
        std=(0.3760,),
        crop_padding=1,
        flip=False,  # digits are not mirror-symmetric
        cutout_size=4,
    ),
    "tinyimagenet": DatasetInfo(
        name="tinyimagenet",
        display_name="Tiny-ImageNet",
        num_classes=200,
        image_size=64,
        channels=3,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2770, 0.2691, 0.2821),
        crop_padding=8,
        flip=True,
        cutout_size=32,
    ),
}

_ALIASES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "digits": "digits",
    "tinyimagenet": "tinyimagenet",
    "tinyimagenet200": "tinyimagenet",
}


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # uint8 [N, C, H, W], contiguous, CPU
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


def available_datasets() -> list[str]:
    return sorted(DATASET_INFO)


def canonical_name(name: str) -> str:
    """``"CIFAR-10"`` -> ``"cifar10"``, ``"tiny-imagenet"`` -> ``"tinyimagenet"``; DataError if unknown."""
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    if key in _ALIASES:
        return _ALIASES[key]
    raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(available_datasets())}")


def get_dataset_info(name: str) -> DatasetInfo:
    return DATASET_INFO[canonical_name(name)]


def default_cache_dir() -> str:
    env = os.environ.get("SAM_BENCH_CACHE")
    return env if env else os.path.join(os.path.expanduser("~"), ".cache", "sam-bench")


def load_dataset_splits(
    name: str,
    data_dir: str | None = None,
    download: bool = True,
    cache_dir: str | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Load ``(train, test)`` for ``name``; raises :class:`DataError` with a
    one-line explanation when the data cannot be found or read.

    ``data_dir`` is searched directly and in ``data_dir/<name>`` (default
    ``./data``, torchvision's default root; ignored for ``digits``). With
    ``download``, the data is fetched when nothing of it is found and either no
    ``data_dir`` was given or it is an existing empty folder (see the module
    docstring); a broken copy is reported, never downloaded over.
    """
    key = canonical_name(name)
    info = DATASET_INFO[key]
    if key == "digits":
        return _load_digits(info)
    where = _Root(os.path.abspath(os.path.expanduser(data_dir if data_dir else "./data")), given=bool(data_dir))
    cache = os.path.abspath(os.path.expanduser(cache_dir if cache_dir else default_cache_dir()))
    if key in ("cifar10", "cifar100"):
        train, test = _load_cifar(info, where, download, cache)
    else:
        train, test = _load_tinyimagenet(info, where, download, cache)
    return _make(info, *train), _make(info, *test)


# --------------------------------------------------------------------------- helpers


def _make(info: DatasetInfo, images: Any, labels: Any) -> ImageDataset:
    images_t = torch.as_tensor(images)
    labels_t = torch.as_tensor(labels).to(torch.int64)
    return ImageDataset(
        images=images_t.contiguous(),
        labels=labels_t.contiguous(),
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        name=info.name,
    )


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_labels(labels: np.ndarray, n_images: int, num_classes: int, where: str) -> np.ndarray:
    labels = np.array(labels, dtype=np.int64).reshape(-1)  # a writable copy
    if labels.shape[0] != n_images:
        raise DataError(f"{where}: {n_images} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels outside [0, {num_classes}) (min {labels.min()}, max {labels.max()}); "
            f"is this the right dataset?"
        )
    return labels


# --------------------------------------------------------------------------- digits


def _load_digits(info: DatasetInfo) -> tuple[ImageDataset, ImageDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 -> 0..255 (round half to even; only 8 -> 127.5 -> 128 is a tie)
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    return _make(info, x_tr, y_tr), _make(info, x_te, y_te)


# --------------------------------------------------------------------------- cache


def _source_key(name: str, paths: Sequence[str], extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_FORMAT, name, extra]).encode())
    for p in paths:
        st = os.stat(p)
        h.update(json.dumps([os.path.abspath(p), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:24]


def _cache_path(cache_dir: str, name: str, key: str) -> str:
    return os.path.join(cache_dir, f"{name}-{key}.safetensors")


_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cache_load(path: str, info: DatasetInfo):
    if not os.path.isfile(path):
        return None
    try:
            # copy out of the memory map: the tensors own their memory, whatever later
        # happens to the file
        t = {k: v.clone() for k, v in load_file(path).items()}
        if not all(k in t for k in _CACHE_KEYS):
            raise ValueError("missing tensors")
        shape = (info.channels, info.image_size, info.image_size)
        for split in ("train", "test"):
            im, lb = t[f"{split}_images"], t[f"{split}_labels"]
            if im.dtype != torch.uint8 or tuple(im.shape[1:]) != shape or lb.shape != (im.shape[0],):
                raise ValueError("unexpected shapes")
    except Exception as exc:  # a broken cache is never fatal: decode again
        warnings.warn(f"ignoring unreadable cache file {path} ({_short(exc)})", stacklevel=3)
        return None
    return (t["train_images"], t["train_labels"]), (t["test_images"], t["test_labels"])


def _cache_save(path: str, train, test, sources: Sequence[str]) -> None:
    tensors = {
        "train_images": torch.as_tensor(train[0]).contiguous(),
        "train_labels": torch.as_tensor(train[1]).to(torch.int64).contiguous(),
        "test_images": torch.as_tensor(test[0]).contiguous(),
        "test_labels": torch.as_tensor(test[1]).to(torch.int64).contiguous(),
    }
    meta = {"format": str(_CACHE_FORMAT), "sources": json.dumps(list(sources)[:50])}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except OSError as exc:  # read-only / full cache dir: keep going without a cache
        warnings.warn(f"could not write the dataset cache {path} ({_short(exc)})", stacklevel=3)


def _cached(info: DatasetInfo, cache_dir: str, sources: Sequence[str], build, extra: str = ""):
    """Return ``build()`` (``((x, y), (x, y))`` as numpy/torch) through the safetensors cache."""
    try:
        key = _source_key(info.name, sources, extra)
    except OSError:
        return build()
    path = _cache_path(cache_dir, info.name, key)
    hit = _cache_load(path, info)
    if hit is not None:
        return hit
    train, test = build()
    train = (torch.from_numpy(np.ascontiguousarray(train[0])), torch.as_tensor(train[1], dtype=torch.int64))
    test = (torch.from_numpy(np.ascontiguousarray(test[0])), torch.as_tensor(test[1], dtype=torch.int64))
    _cache_save(path, train, test, sources)
    return train, test


# --------------------------------------------------------------------------- finding and downloading


@dataclass(frozen=True)
class _Root:
    path: str  # absolute
    given: bool  # named by the user (data_dir), as opposed to the default ./data


@dataclass
class _Findings:
    """What a search turned up besides a usable copy."""

    broken: list[str] = field(default_factory=list)  # a copy of this dataset that cannot be used
    other: list[str] = field(default_factory=list)  # files of some other dataset or format


def _scan(folder: str) -> list[os.DirEntry]:
    """The entries of ``folder``; a DataError naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as exc:
        raise DataError(f"cannot list {folder} ({_short(exc)})") from None


def _visible_entries(folder: str) -> list[str]:
    """Sorted names in ``folder``, folders with a trailing ``/``, hidden entries left out."""
    return sorted(e.name + ("/" if e.is_dir() else "") for e in _scan(folder) if not e.name.startswith("."))


def _describe_entries(entries: Sequence[str], show: int = 5) -> str:
    """``"3 files (a.txt, b.txt, c.txt)"``, ``"2 files and 1 folder (a, b, sub/)"``."""
    n_dirs = sum(e.endswith("/") for e in entries)
    n_files = len(entries) - n_dirs
    parts = [f"{n} {word}{'s' if n != 1 else ''}" for n, word in ((n_files, "file"), (n_dirs, "folder")) if n]
    names = ", ".join(entries[:show]) + (", ..." if len(entries) > show else "")
    return f"{' and '.join(parts)} ({names})"


def _find_archives(dirs: Sequence[str], archive: str, folder: str, found: _Findings) -> None:
    """An archive lying in a searched folder without its extracted ``folder`` is a broken copy."""
    for d in dirs:
        path = os.path.join(d, archive)
        if os.path.isfile(path) and not os.path.isdir(os.path.join(d, folder)):
            found.broken.append(
                f"{path} was never extracted (an interrupted download?); extract it into {d} "
                f"or delete it to download again"
            )


@dataclass(frozen=True)
class _Wanted:
    """How a loader words a missing dataset."""

    what: str  # "cifar-10-batches-py/ or train*.parquet + test*.parquet"
    where: str  # " in X or X/cifar10 (also under plain_text/ or data/)"
    howto: str  # "get it with `...` or `...`"


def _download_allowed(info: DatasetInfo, root: _Root, download: bool, found: _Findings, wanted: _Wanted) -> str:
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
    entries = _visible_entries(path) if os.path.isdir(path) else []
    if not os.path.isdir(path):
        state = f"{path} (the default data_dir) does not exist"
    elif not entries:
        state = f"{path} is empty (expected {wanted.what})"
    else:
        state = f"{path} holds {_describe_entries(entries)} but no {wanted.what}{wanted.where}"
    state += "".join(f"; {note}" for note in found.other)
    if not download:
        raise DataError(f"{name} not found: {state}; download is off; {howto}")
    if root.given and entries:
        raise DataError(
            f"{name} not found: {state}; nothing was downloaded: a download only goes into an empty data_dir "
            f"(or into ./data when no data_dir is given); {howto}"
        )
    return state


# --------------------------------------------------------------------------- decoding


def _decode_images(blobs: Sequence[Any], size: int, channels: int, where: str) -> np.ndarray:
    """Decode encoded images (bytes, or file paths) to uint8 ``[N, C, H, W]``.

    Uses PIL (the decoder ``datasets`` uses for its Image feature), converting
    to RGB / L as needed; every image must be ``size`` x ``size``.
    """
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(blobs), size, size, channels), dtype=np.uint8)
    view = out if channels != 1 else out[..., 0]
    for i, blob in enumerate(blobs):
        try:
            src = io.BytesIO(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else blob
            with Image.open(src) as im:
                if im.mode != mode:
                    im = im.convert(mode)
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            label = blob if isinstance(blob, str) else f"image #{i}"
            raise DataError(f"{where}: cannot decode {label} ({_short(exc)})") from None
        if arr.shape[:2] != (size, size):
            label = blob if isinstance(blob, str) else f"image #{i}"
            raise DataError(f"{where}: {label} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
        view[i] = arr
    return out.transpose(0, 3, 1, 2)


def _image_blobs(table, column: str, base_dir: str | None) -> list[Any]:
    """Encoded bytes (or file paths) of an Image-feature column of an Arrow table."""
    import pyarrow as pa

    col = table.column(column)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_struct(col.type):
        names = [col.type.field(i).name for i in range(col.type.num_fields)]
        data = col.field("bytes").to_pylist() if "bytes" in names else [None] * len(col)
        paths = col.field("path").to_pylist() if "path" in names else [None] * len(col)
    elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        data, paths = col.to_pylist(), [None] * len(col)
    else:
        raise DataError(f"column {column!r} has type {col.type}, expected an Image feature (bytes/path)")
    blobs: list[Any] = []
    for b, p in zip(data, paths):
        if b is not None:
            blobs.append(b)
        elif p is not None:
            blobs.append(p if os.path.isabs(p) or base_dir is None else os.path.join(base_dir, p))
        else:
            raise DataError(f"column {column!r} has an image with neither bytes nor path")
    return blobs


def _decode_hf_split(ds, image_col: str, label_col: str, info: DatasetInfo, where: str, base_dir: str | None):
    table = ds.with_format("arrow")[:]
    blobs = _image_blobs(table, image_col, base_dir)
    labels = np.asarray(table.column(label_col).to_numpy(zero_copy_only=False), dtype=np.int64)
    images = _decode_images(blobs, info.image_size, info.channels, where)
    labels = _check_labels(labels, images.shape[0], info.num_classes, where)
    return images, labels


def _quiet_datasets():
    """Context manager silencing ``datasets`` progress bars while we load."""
    import datasets

    @contextlib.contextmanager
    def ctx():
        was_disabled = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            yield datasets
        finally:
            if not was_disabled:
                datasets.enable_progress_bars()

    return ctx()


def _unreadable_parquet(info: DatasetInfo, paths: Sequence[str], exc: BaseException) -> DataError:
    """The error for parquet files ``datasets`` could not read, naming the first file pyarrow cannot read."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            pq.read_table(path)
        except Exception as file_exc:
            return DataError(f"{info.display_name}: cannot read {path} ({_short(file_exc)})")
    return DataError(f"{info.display_name}: cannot read parquet files {list(paths)} ({_short(exc)})")


def _load_parquet_splits(
    info: DatasetInfo,
    files: dict[str, list[str]],
    image_col: str,
    label_col: str,
    cache_dir: str,
):
    """Decode ``{"train": [...], "test": [...]}`` parquet files (through the cache)."""
    sources = sorted(files["train"]) + sorted(files["test"])

    def build():
        # load_dataset copies the parquet into an Arrow cache; keep that copy in a
        # temporary folder so that only our decoded safetensors file stays on disk.
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".hf-", dir=cache_dir)
        except OSError:
            tmp = tempfile.mkdtemp(prefix="sam-bench-hf-")
        try:
            with _quiet_datasets() as datasets:
                try:
                    dd = datasets.load_dataset("parquet", data_files=files, cache_dir=tmp)
                except Exception as exc:
                    raise _unreadable_parquet(info, sources, exc) from None
                out = []
                for split in ("train", "test"):
                    where = f"{info.name} {split} ({files[split][0]})"
                    base = os.path.dirname(files[split][0])
                    out.append(_decode_hf_split(dd[split], image_col, label_col, info, where, base))
                del dd
            return out[0], out[1]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return _cached(info, cache_dir, sources, build, extra=f"{image_col}/{label_col}")


def _parquet_problem(paths: Sequence[str], columns: set[str]) -> tuple[str | None, bool]:
    """``(problem, unreadable)`` for the first of ``paths`` that cannot be read or lacks ``columns``."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            have = set(pq.read_schema(path).names)
        except Exception as exc:
            return f"cannot read {path} ({_short(exc)})", True
        if not columns <= have:
            return f"{path} has the columns {sorted(have)}, expected {sorted(columns)}", False
    return None, False


def _find_parquet(
    dirs: Sequence[str],
    subdirs: Sequence[str],
    globs: tuple[str, str],
    columns: set[str],
    found: _Findings,
    specific_subdirs: Sequence[str] = (),
) -> dict[str, list[str]] | None:
    """The first folder ``dir/subdir`` holding train and test parquet files (``globs``) with ``columns``.

    Other matches go into ``found``: an unreadable file, or files with the right
    columns but one split only, are broken copies; files with other columns are
    a broken copy in a folder named for the dataset (``dirs[1:]`` or a
    ``specific_subdirs``) and something else elsewhere.
    """
    for i, d in enumerate(dirs):
        for sub in subdirs:
            folder = os.path.join(d, sub) if sub else d
            train, test = (sorted(glob.glob(os.path.join(folder, g))) for g in globs)
            if not train and not test:
                continue
            problem, unreadable = _parquet_problem(train + test, columns)
            if problem is not None:
                ours = unreadable or i > 0 or sub in specific_subdirs
                (found.broken if ours else found.other).append(problem)
            elif not train or not test:
                have, missing = (globs[0], globs[1]) if train else (globs[1], globs[0])
                found.broken.append(f"{folder} has {have} but no {missing} files (an interrupted download?)")
            else:
                return {"train": train, "test": test}
    return None


def _dedupe(paths: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for p in paths:
        p = os.path.normpath(p)
        if p not in seen:
            seen.append(p)
    return seen


# --------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "label_col": "label",
        "hub": "uoft-cs/cifar10",
        "hub_sub": "plain_text",
        "tv": "CIFAR10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "label_col": "fine_label",
        "hub": "uoft-cs/cifar100",
        "hub_sub": "cifar100",
        "tv": "CIFAR100",
    },
}


def _read_cifar_batch(info: DatasetInfo, path: str) -> tuple[np.ndarray, np.ndarray]:
    spec = _CIFAR[info.name]
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[spec["label_key"]], dtype=np.int64)
        data = data.reshape(-1, 3, 32, 32)
    except KeyError as exc:
        raise DataError(f"{path}: missing key {exc} in the CIFAR pickle; is it the right dataset?") from None
    except Exception as exc:
        raise DataError(f"cannot read {path} ({_short(exc)}); delete the folder and download again") from None
    return data, _check_labels(labels, data.shape[0], info.num_classes, path)


def _read_cifar_pickles(info: DatasetInfo, folder: str):
    spec = _CIFAR[info.name]
    out = []
    for split in ("train", "test"):
        batches = [_read_cifar_batch(info, os.path.join(folder, fname)) for fname in spec[split]]
        out.append((np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])))
    return out[0], out[1]


def _find_cifar_pickles(info: DatasetInfo, dirs: Sequence[str], found: _Findings) -> str | None:
    """The first complete torchvision folder; an incomplete one is a broken copy."""
    spec = _CIFAR[info.name]
    names = spec["train"] + spec["test"]
    for d in dirs:
        folder = os.path.join(d, spec["folder"])
        if not os.path.isdir(folder):
            continue
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if not missing:
            return folder
        found.broken.append(
            f"{folder} is incomplete (missing {', '.join(missing)}; an interrupted download or extraction?); "
            f"delete it to download again"
        )
    return None


def _torchvision_download(name: str, root: str) -> None:
    """Download and extract CIFAR with torchvision into ``root`` (monkeypatched in tests)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, _CIFAR[name]["tv"])
    cls(root=root, train=False, download=True)  # train=False: only the small test batch is loaded


def _cifar_wanted(info: DatasetInfo, root: str, dirs: Sequence[str]) -> _Wanted:
    spec = _CIFAR[info.name]
    return _Wanted(
        what=f"{spec['folder']}/ or train*.parquet + test*.parquet",
        where=f" in {' or '.join(dirs)} (also under {spec['hub_sub']}/ or data/)",
        howto=(
            f"get it with `python -c \"import torchvision; torchvision.datasets.{spec['tv']}('{root}', download=True)\"` "
            f"or `huggingface-cli download {spec['hub']} --repo-type dataset --local-dir {os.path.join(root, info.name)}`"
        ),
    )


def _load_cifar(info: DatasetInfo, root: _Root, download: bool, cache_dir: str):
    spec = _CIFAR[info.name]
    dirs = _dedupe([root.path, os.path.join(root.path, info.name)])
    found = _Findings()
    folder = _find_cifar_pickles(info, dirs, found)
    if folder is not None:
        return _read_cifar_pickles(info, folder)
    columns = {"img", spec["label_col"]}
    subdirs = ["", spec["hub_sub"], "data"]
    files = _find_parquet(dirs, subdirs, ("train*.parquet", "test*.parquet"), columns, found, [spec["hub_sub"]])
    if files is not None:
        return _load_parquet_splits(info, files, "img", spec["label_col"], cache_dir)
    _find_archives(dirs, spec["archive"], spec["folder"], found)

    wanted = _cifar_wanted(info, root.path, dirs)
    state = _download_allowed(info, root, download, found, wanted)
    try:
        _torchvision_download(info.name, root.path)
    except Exception as exc:
        raise DataError(
            f"{info.display_name} not found: {state}; the download into {root.path} failed ({_short(exc)}); "
            f"{wanted.howto}"
        ) from None
    folder = _find_cifar_pickles(info, [root.path], _Findings())
    if folder is None:
        raise DataError(
            f"{info.display_name}: the download into {root.path} finished but "
            f"{os.path.join(root.path, spec['folder'])} is incomplete; {wanted.howto}"
        )
    return _read_cifar_pickles(info, folder)


# --------------------------------------------------------------------------- Tiny-ImageNet

_TINY_HUB = "zh-plus/tiny-imagenet"
_TINY_FOLDER = "tiny-imagenet-200"


def _tiny_dirs(root: str) -> list[str]:
    return _dedupe(
        [
            root,
            os.path.join(root, _TINY_FOLDER),
            os.path.join(root, "tinyimagenet"),
            os.path.join(root, "tinyimagenet", _TINY_FOLDER),
            os.path.join(root, "tiny-imagenet"),
        ]
    )


def _find_tiny_folder(dirs: Sequence[str], found: _Findings) -> str | None:
    """The first complete ``tiny-imagenet-200`` folder (train/ and val/val_annotations.txt).

    A folder named ``tiny-imagenet-200`` or holding ``wnids.txt`` without both is a broken copy.
    """
    for d in dirs:
        ann = os.path.join(d, "val", "val_annotations.txt")
        if os.path.isdir(os.path.join(d, "train")) and os.path.isfile(ann):
            return d
        if os.path.isdir(d) and (os.path.basename(d) == _TINY_FOLDER or os.path.isfile(os.path.join(d, "wnids.txt"))):
            missing = [m for m, ok in (("train/", os.path.isdir(os.path.join(d, "train"))), (ann, os.path.isfile(ann)))
                       if not ok]
            found.broken.append(f"{d} is incomplete (no {' and no '.join(missing)}); delete it to download again")
    return None


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, ValueError) as exc:
        raise DataError(f"Tiny-ImageNet: cannot read {path} ({_short(exc)})") from None


def _tiny_classes(folder: str) -> list[str]:
    """The sorted class ids: ``wnids.txt``, or else the class folders under ``train/``."""
    wnids_file = os.path.join(folder, "wnids.txt")
    train_dir = os.path.join(folder, "train")
    if os.path.isfile(wnids_file):
        wnids = sorted({line.strip() for line in _read_lines(wnids_file) if line.strip()})
    else:
        wnids = sorted(e.name for e in _scan(train_dir) if e.is_dir())
    if not wnids:
        raise DataError(f"Tiny-ImageNet: no classes in {wnids_file} or {train_dir}")
    return wnids


def _tiny_train_files(folder: str, wnids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    for i, w in enumerate(wnids):
        img_dir = os.path.join(folder, "train", w, "images")
        if not os.path.isdir(img_dir):
            raise DataError(f"Tiny-ImageNet: class folder {img_dir} is missing")
        names = sorted(e.name for e in _scan(img_dir) if e.is_file() and not e.name.startswith("."))
        files += [os.path.join(img_dir, n) for n in names]
        labels += [i] * len(names)
    return files, np.asarray(labels, np.int64)


def _tiny_val_files(folder: str, wnids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The labelled ``val/`` split (our test split), sorted by file name."""
    index = {w: i for i, w in enumerate(wnids)}
    ann = os.path.join(folder, "val", "val_annotations.txt")
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
    order = np.argsort(np.array(files, dtype=object), kind="stable") if files else []
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
    _check_labels(trl, len(trf), info.num_classes, folder)

    def build():
        tr = _decode_images(trf, info.image_size, info.channels, f"Tiny-ImageNet train ({folder})")
        te = _decode_images(tef, info.image_size, info.channels, f"Tiny-ImageNet val ({folder})")
        return (tr, trl), (te, tel)

    return _cached(info, cache_dir, trf + tef, build, extra="folder")


def _hf_download(repo_id: str):
    """``datasets.load_dataset(repo_id)`` (monkeypatched in tests)."""
    with _quiet_datasets() as datasets:
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
        return tuple(
            _decode_hf_split(splits[s], "image", "label", info, f"{_TINY_HUB} {s}", None) for s in ("train", "test")
        )

    if not sources:  # in-memory dataset: nothing to key a cache on
        return build()
    return _cached(info, cache_dir, sources, build, extra="hub")


def _load_tinyimagenet(info: DatasetInfo, root: _Root, download: bool, cache_dir: str):
    dirs = _tiny_dirs(root.path)
    found = _Findings()
    folder = _find_tiny_folder(dirs, found)
    if folder is not None:
        return _load_tiny_folder(info, folder, cache_dir)
    files = _find_parquet(dirs, ["data", ""], ("train-*.parquet", "valid-*.parquet"), {"image", "label"}, found)
    if files is not None:
        return _load_parquet_splits(info, files, "image", "label", cache_dir)
    _find_archives([root.path], f"{_TINY_FOLDER}.zip", _TINY_FOLDER, found)

    wanted = _Wanted(
        what=f"{_TINY_FOLDER}/ (train/, val/val_annotations.txt) or data/train-*.parquet + data/valid-*.parquet",
        where=f" in {' or '.join(dirs[:2])}",
        howto=(
            f"get it with `huggingface-cli download {_TINY_HUB} --repo-type dataset --local-dir {root.path}` "
            f"or unzip http://cs231n.stanford.edu/{_TINY_FOLDER}.zip into {root.path}"
        ),
    )
    state = _download_allowed(info, root, download, found, wanted)
    try:
        dd = _hf_download(_TINY_HUB)
    except Exception as exc:
        raise DataError(
            f"{info.display_name} not found: {state}; downloading {_TINY_HUB} failed ({_short(exc)}); {wanted.howto}"
        ) from None
    return _load_tiny_hub(info, dd, cache_dir)


# --------------------------------------------------------------------------- training-set preparation


def training_subset(data: ImageDataset, size: int) -> ImageDataset:
    """A fixed stratified-by-chance subset of ``size`` images (seed 0, the same for every run),
    for CPU-scale benchmarks on large datasets."""
    if not 0 < size <= len(data):
        raise DataError(f"train_subset must be in [1, {len(data)}] for {data.name}, got {size}")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:size].sort().values
    return _select(data, keep)


def with_label_noise(data: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, torch.Tensor]:
    """Symmetric label noise: ``fraction`` of the labels, chosen with ``seed``, replaced by a
    different class drawn uniformly. Returns the noisy dataset and the indices changed."""
    g = torch.Generator().manual_seed(seed)
    n = round(fraction * len(data))
    changed = torch.randperm(len(data), generator=g)[:n].sort().values
    shift = torch.randint(1, data.num_classes, (n,), generator=g)
    labels = data.labels.clone()
    labels[changed] = (labels[changed] + shift) % data.num_classes
    return dataclasses.replace(data, labels=labels), changed


@dataclass(frozen=True)
class PreparedData:
    """The training set of a run, as :func:`prepare_train_set` leaves it."""

    train: ImageDataset  # what the model is trained on (labels possibly noisy)
    val: ImageDataset | None  # the held-out validation split, clean labels; None without one
    noisy_indices: torch.Tensor | None  # indices into ``train`` whose label was changed; None without noise


def prepare_train_set(
    train: ImageDataset,
    *,
    subset: int | None,
    label_noise: float,
    seed: int,
    val_fraction: float = 0.0,
    split_seed: int = 0,
) -> PreparedData:
    """Apply a run's training-set options, in this order:

    1. ``subset`` (None: all images): the fixed subset of :func:`training_subset`;
    2. ``val_fraction`` in [0, 1) (0: no split): a held-out validation split,
       stratified by class and fixed by ``split_seed`` alone (see
       :func:`_validation_split`), so every run seed and optimizer sees the same one;
    3. ``label_noise`` in [0, 1) (0: none): :func:`with_label_noise` with the run
       ``seed``, on the remaining training part only; validation labels stay clean.

    With ``val_fraction`` 0 the result is exactly that of the ``training_subset`` and
    ``with_label_noise`` calls on their own. Bad arguments raise a one-line :class:`DataError`.
    The same applies to an image-folder dataset (``bench.streaming.FolderSplit``): it selects
    file paths and labels instead of images.
    """
    for what, value in (("label_noise", label_noise), ("val_fraction", val_fraction)):
        if not 0 <= value < 1:
            raise DataError(f"{what} must be in [0, 1), got {value}")
    if subset is not None:
        train = training_subset(train, subset)
    val = None
    if val_fraction:
        train, val = _validation_split(train, val_fraction, split_seed)
    noisy = None
    if label_noise:
        train, noisy = with_label_noise(train, label_noise, seed)
    return PreparedData(train=train, val=val, noisy_indices=noisy)


def _validation_counts(counts: np.ndarray, fraction: float, class_order: np.ndarray, name: str) -> np.ndarray:
    """Images to hold out per class, ``floor`` or ``ceil`` of ``fraction * n_c``, ``round(fraction * N)`` in all.

    Every class holds out ``floor(fraction * n_c)``; the classes with the largest
    remainders (ties in ``class_order``) hold out one more until the total is reached,
    except those it would leave without a training image. A DataError when the total
    cannot be reached that way, or is 0.
    """
    total = math.floor(fraction * int(counts.sum()) + 0.5)
    if total == 0:
        raise DataError(
            f"val_fraction {fraction} of the {int(counts.sum())} training images of {name} holds out no image; "
            f"use a larger val_fraction or none"
        )
    quota = fraction * counts
    take = np.floor(quota + 1e-9).astype(np.int64)  # 1e-9: 0.1 * 30 is 3.0000000000000004
    remainder = quota - take
    ranked = [int(c) for c in class_order[np.argsort(-remainder[class_order], kind="stable")] if remainder[c] > 1e-9]
    eligible = [c for c in ranked if counts[c] - take[c] > 1]
    extra = total - int(take.sum())
    if extra > len(eligible):
        c = next(c for c in ranked if c not in eligible)
        raise DataError(
            f"val_fraction {fraction} would leave class {c} of {name} ({int(counts[c])} images) without a training "
            f"image; use a smaller val_fraction or a larger train_subset"
        )
    take[eligible[:extra]] += 1
    return take


def _validation_split(data: ImageDataset, fraction: float, split_seed: int) -> tuple[ImageDataset, ImageDataset]:
    """``(train, val)``: a stratified split holding out ``fraction`` of every class.

    A generator seeded with ``split_seed`` draws, in this order, a permutation of the
    classes (tie-break among equal remainders, see :func:`_validation_counts`) and a
    permutation of the images; each class holds out its images that come first in the
    latter. Both parts keep the original image order.
    """
    g = torch.Generator().manual_seed(int(split_seed))
    class_order = torch.randperm(data.num_classes, generator=g).numpy()
    order = torch.randperm(len(data), generator=g)
    labels = data.labels.numpy()
    counts = np.bincount(labels, minlength=data.num_classes)
    take = _validation_counts(counts, fraction, class_order, data.name)
    permuted = labels[order.numpy()]
    by_class = np.argsort(permuted, kind="stable")  # positions in ``order``, grouped by class
    rank = np.arange(len(data)) - (np.cumsum(counts) - counts)[permuted[by_class]]
    held = np.zeros(len(data), dtype=bool)
    held[order.numpy()[by_class[rank < take[permuted[by_class]]]]] = True
    keep, out = torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))
    return _select(data, keep), _select(data, out)


def _select(data: ImageDataset, indices: torch.Tensor) -> ImageDataset:
    """The samples ``indices`` of ``data``; a dataset read from files (``bench.streaming.FolderSplit``) selects its own."""
    if not isinstance(data, ImageDataset):
        return data.select(indices)
    return dataclasses.replace(data, images=data.images[indices].contiguous(), labels=data.labels[indices].contiguous())
