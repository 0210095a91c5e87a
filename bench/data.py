"""Image classification datasets as whole uint8 tensors in memory.

``load_dataset_splits(name, data_dir)`` returns ``(train, test)`` as
:class:`ImageDataset` objects holding every image as one uint8 ``[N, C, H, W]``
tensor, ready for batch-wise augmentation (``bench.augment``) on any device.

Supported datasets (names are case-insensitive, ``-``/``_`` ignored):

* ``digits``: scikit-learn's 8x8 digits, embedded, no download.
* ``cifar10`` / ``cifar100``: torchvision's pickled batches or the Hugging
  Face Hub parquet files (``uoft-cs/cifar10`` / ``uoft-cs/cifar100``).
* ``tinyimagenet``: the original ``tiny-imagenet-200`` folder or the Hub
  parquet files of ``zh-plus/tiny-imagenet``.

Images that must be decoded (parquet, JPEG folders) are decoded once and the
result is cached as a safetensors file under ``cache_dir`` (default
``$SAM_BENCH_CACHE`` or ``~/.cache/sam-bench``), keyed by the paths, sizes and
modification times of the source files.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.augment import Augmentation

__all__ = [
    "DataError",
    "DatasetInfo",
    "ImageDataset",
    "DATASET_INFO",
    "available_datasets",
    "canonical_name",
    "get_dataset_info",
    "default_cache_dir",
    "load_dataset_splits",
]

_CACHE_FORMAT = 1  # bump to invalidate every cache file


class DataError(Exception):
    """A user-facing data problem. The message is a single line saying what was
    looked for, where, and how to get it."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    display_name: str
    num_classes: int
    image_size: int  # height == width
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Augmentation  # default augmentation, cutout off
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
        augmentation=Augmentation(crop_padding=4, flip=True, cutout=0),
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
        augmentation=Augmentation(crop_padding=4, flip=True, cutout=0),
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
        augmentation=Augmentation(crop_padding=1, flip=False, cutout=0),
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
        augmentation=Augmentation(crop_padding=8, flip=True, cutout=0),
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
    ``download`` the files are fetched when nothing is found locally.
    """
    key = canonical_name(name)
    info = DATASET_INFO[key]
    if key == "digits":
        return _load_digits(info)
    root = os.path.abspath(os.path.expanduser(data_dir if data_dir else "./data"))
    cache = os.path.abspath(os.path.expanduser(cache_dir if cache_dir else default_cache_dir()))
    if key in ("cifar10", "cifar100"):
        train, test = _load_cifar(info, root, download, cache)
    else:
        train, test = _load_tinyimagenet(info, root, download, cache)
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
        from safetensors.torch import load_file

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
    from safetensors.torch import save_file

    tensors = {
        "train_images": torch.as_tensor(train[0]).contiguous(),
        "train_labels": torch.as_tensor(train[1]).to(torch.int64).contiguous(),
        "test_images": torch.as_tensor(test[0]).contiguous(),
        "test_labels": torch.as_tensor(test[1]).to(torch.int64).contiguous(),
    }
    meta = {"format": str(_CACHE_FORMAT), "sources": json.dumps(list(sources)[:50])}
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:  # read-only / full cache dir: keep going without a cache
        warnings.warn(f"could not write the dataset cache {path} ({_short(exc)})", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


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
    import contextlib

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
        parent = cache_dir
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".hf-", dir=parent)
        except OSError:
            tmp = tempfile.mkdtemp(prefix="sam-bench-hf-")
        try:
            with _quiet_datasets() as datasets:
                try:
                    dd = datasets.load_dataset("parquet", data_files=files, cache_dir=tmp)
                except Exception as exc:
                    raise DataError(f"{info.name}: cannot read parquet files {sources} ({_short(exc)})") from None
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


def _parquet_columns(path: str) -> set[str] | None:
    try:
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    except Exception:
        return None


def _find_parquet(
    dirs: Sequence[str], subdirs: Sequence[str], train_glob: str, test_glob: str, columns: set[str], notes: list[str]
) -> dict[str, list[str]] | None:
    for d in dirs:
        for sub in subdirs:
            folder = os.path.join(d, sub) if sub else d
            if not os.path.isdir(folder):
                continue
            train = sorted(glob.glob(os.path.join(folder, train_glob)))
            test = sorted(glob.glob(os.path.join(folder, test_glob)))
            if not train or not test:
                continue
            have = _parquet_columns(train[0])
            if have is None or not columns <= have:
                notes.append(
                    f"{folder} has parquet files without the columns {sorted(columns)}"
                    + (f" (found {sorted(have)})" if have else " (unreadable)")
                )
                continue
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
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "label_col": "fine_label",
        "hub": "uoft-cs/cifar100",
        "hub_sub": "cifar100",
        "tv": "CIFAR100",
    },
}


def _read_cifar_pickles(info: DatasetInfo, folder: str):
    spec = _CIFAR[info.name]
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        for fname in spec[split]:
            path = os.path.join(folder, fname)
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
            xs.append(data)
            ys.append(_check_labels(labels, data.shape[0], info.num_classes, path))
        out.append((np.concatenate(xs), np.concatenate(ys)))
    return out[0], out[1]


def _find_cifar_pickles(info: DatasetInfo, dirs: Sequence[str]) -> str | None:
    spec = _CIFAR[info.name]
    for d in dirs:
        folder = os.path.join(d, spec["folder"])
        if all(os.path.isfile(os.path.join(folder, f)) for f in spec["train"] + spec["test"]):
            return folder
    return None


def _torchvision_download(name: str, root: str) -> None:
    """Download and extract CIFAR with torchvision into ``root`` (monkeypatched in tests)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, _CIFAR[name]["tv"])
    cls(root=root, train=False, download=True)  # train=False: only the small test batch is loaded


def _load_cifar(info: DatasetInfo, root: str, download: bool, cache_dir: str):
    spec = _CIFAR[info.name]
    dirs = _dedupe([root, os.path.join(root, info.name)])
    notes: list[str] = []

    folder = _find_cifar_pickles(info, dirs)
    if folder is not None:
        return _read_cifar_pickles(info, folder)

    subdirs = list(dict.fromkeys(["", spec["hub_sub"], "plain_text", "cifar100", "data"]))
    files = _find_parquet(dirs, subdirs, "train*.parquet", "test*.parquet", {"img", spec["label_col"]}, notes)
    if files is not None:
        return _load_parquet_splits(info, files, "img", spec["label_col"], cache_dir)

    searched = (
        f"looked for {spec['folder']}/ (torchvision) and train*.parquet + test*.parquet "
        f"(Hugging Face, also under {spec['hub_sub']}/ or data/) in {' and '.join(dirs)}"
    )
    howto = (
        f"get it with `python -c \"import torchvision; torchvision.datasets.{spec['tv']}('{root}', download=True)\"` "
        f"or `huggingface-cli download {spec['hub']} --repo-type dataset --local-dir {os.path.join(root, info.name)}`, "
        f"then point data_dir at {root}"
    )
    extra = ("; " + "; ".join(notes)) if notes else ""
    if not download:
        raise DataError(f"{info.display_name} not found: {searched}{extra}; download is off; {howto}")
    try:
        _torchvision_download(info.name, root)
    except Exception as exc:
        raise DataError(
            f"{info.display_name} not found: {searched}{extra}; the download into {root} failed ({_short(exc)}); {howto}"
        ) from None
    folder = _find_cifar_pickles(info, [root])
    if folder is None:
        raise DataError(
            f"{info.display_name}: the download into {root} finished but {os.path.join(root, spec['folder'])} "
            f"is incomplete; {howto}"
        )
    return _read_cifar_pickles(info, folder)


# --------------------------------------------------------------------------- Tiny-ImageNet

_TINY_HUB = "zh-plus/tiny-imagenet"


def _find_tiny_folder(dirs: Sequence[str]) -> str | None:
    for d in dirs:
        if os.path.isdir(os.path.join(d, "train")) and os.path.isfile(
            os.path.join(d, "val", "val_annotations.txt")
        ):
            return d
    return None


def _tiny_folder_files(folder: str):
    wnids_file = os.path.join(folder, "wnids.txt")
    train_dir = os.path.join(folder, "train")
    if os.path.isfile(wnids_file):
        with open(wnids_file) as f:
            wnids = sorted({line.strip() for line in f if line.strip()})
    else:
        wnids = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not wnids:
        raise DataError(f"Tiny-ImageNet: no classes in {wnids_file} or {train_dir}")
    index = {w: i for i, w in enumerate(wnids)}
    train_files, train_labels = [], []
    for w in wnids:
        img_dir = os.path.join(train_dir, w, "images")
        if not os.path.isdir(img_dir):
            raise DataError(f"Tiny-ImageNet: class folder {img_dir} is missing")
        names = sorted(e.name for e in os.scandir(img_dir) if e.is_file() and not e.name.startswith("."))
        train_files += [os.path.join(img_dir, n) for n in names]
        train_labels += [index[w]] * len(names)
    ann = os.path.join(folder, "val", "val_annotations.txt")
    test_files, test_labels = [], []
    with open(ann) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().split("\t")
            if len(parts) < 2:
                if line.strip():
                    raise DataError(f"{ann}:{lineno}: expected 'file<TAB>wnid...', got {line.strip()!r}")
                continue
            if parts[1] not in index:
                raise DataError(f"{ann}:{lineno}: class {parts[1]!r} is not in wnids.txt")
            test_files.append(os.path.join(folder, "val", "images", parts[0]))
            test_labels.append(index[parts[1]])
    order = np.argsort(np.array(test_files, dtype=object), kind="stable") if test_files else []
    test_files = [test_files[i] for i in order]
    test_labels = [test_labels[i] for i in order]
    for p in test_files:
        if not os.path.isfile(p):
            raise DataError(f"Tiny-ImageNet: {p} (listed in {ann}) is missing")
    return (train_files, np.asarray(train_labels, np.int64)), (test_files, np.asarray(test_labels, np.int64))


def _hf_download(repo_id: str):
    """``datasets.load_dataset(repo_id)`` (monkeypatched in tests)."""
    with _quiet_datasets() as datasets:
        return datasets.load_dataset(repo_id)


def _load_tinyimagenet(info: DatasetInfo, root: str, download: bool, cache_dir: str):
    dirs = _dedupe(
        [
            root,
            os.path.join(root, "tiny-imagenet-200"),
            os.path.join(root, "tinyimagenet"),
            os.path.join(root, "tinyimagenet", "tiny-imagenet-200"),
            os.path.join(root, "tiny-imagenet"),
        ]
    )
    folder = _find_tiny_folder(dirs)
    if folder is not None:
        (trf, trl), (tef, tel) = _tiny_folder_files(folder)
        _check_labels(trl, len(trf), info.num_classes, folder)

        def build():
            tr = _decode_images(trf, info.image_size, info.channels, f"Tiny-ImageNet train ({folder})")
            te = _decode_images(tef, info.image_size, info.channels, f"Tiny-ImageNet val ({folder})")
            return (tr, trl), (te, tel)

        return _cached(info, cache_dir, trf + tef, build, extra="folder")

    notes: list[str] = []
    files = _find_parquet(dirs, ["data", ""], "train-*.parquet", "valid-*.parquet", {"image", "label"}, notes)
    if files is not None:
        return _load_parquet_splits(info, files, "image", "label", cache_dir)

    searched = (
        f"looked for tiny-imagenet-200/ (train/, val/val_annotations.txt) and data/train-*.parquet + "
        f"data/valid-*.parquet ({_TINY_HUB}) in {' and '.join(dirs[:2])}"
    )
    howto = (
        f"get it with `huggingface-cli download {_TINY_HUB} --repo-type dataset --local-dir {root}` "
        f"or unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip into {root}"
    )
    extra = ("; " + "; ".join(notes)) if notes else ""
    if not download:
        raise DataError(f"{info.display_name} not found: {searched}{extra}; download is off; {howto}")
    try:
        dd = _hf_download(_TINY_HUB)
    except Exception as exc:
        raise DataError(
            f"{info.display_name} not found: {searched}{extra}; downloading {_TINY_HUB} failed ({_short(exc)}); {howto}"
        ) from None
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


def training_subset(data: ImageDataset, size: int) -> ImageDataset:
    """A fixed stratified-by-chance subset of ``size`` images (seed 0, the same for every run),
    for CPU-scale benchmarks on large datasets."""
    if not 0 < size <= len(data):
        raise DataError(f"train_subset must be in [1, {len(data)}] for {data.name}, got {size}")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:size].sort().values
    return dataclasses.replace(data, images=data.images[keep].contiguous(), labels=data.labels[keep].contiguous())


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
