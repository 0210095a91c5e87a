"""Image-folder datasets: ``DIR/train/<class>/`` and ``DIR/val/<class>/``; only the file list is kept in memory."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bench.data.datasets import short_error
from bench.data.names import DEFAULT_IMAGE_SIZE, DataError
from bench.data.views import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


# -- image folders -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FolderSplit:
    """One split of an image-folder dataset: file paths (relative to ``root``) and labels."""

    root: str
    files: np.ndarray  # object array of relative paths
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    name: str = "imagefolder"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    image_size: int = DEFAULT_IMAGE_SIZE  # the side of the views made of it

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def select(self, indices) -> FolderSplit:
        keep = torch.as_tensor(indices, dtype=torch.int64)
        return dataclasses.replace(self, files=self.files[keep.numpy()], labels=self.labels[keep].contiguous())

    def items(self, seed: int | None = None, start: int = 0) -> Iterator[tuple[int, str, int]]:
        """``(index, path, label)`` in the order of ``torch.randperm`` seeded with ``seed`` (the
        files' order for None), from position ``start`` on."""
        n = len(self)
        order = range(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        labels = self.labels.tolist()
        for k in itertools.islice(order, start, None):
            yield k, os.path.join(self.root, self.files[k]), labels[k]


def _listing(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"imagefolder: cannot list {folder} ({short_error(exc)})") from None


def _image_files(folder: str, prefix: str = "") -> list[str]:
    """Paths (``prefix/...``) of the image files under ``folder``, sorted, sub-folders included."""
    files = []
    for entry in _listing(folder):
        relative = f"{prefix}/{entry.name}" if prefix else entry.name
        if entry.is_dir():
            files += _image_files(entry.path, relative)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            files.append(relative)
    return files


def _folder_split(root: str, split: str, classes: list[str] | None) -> FolderSplit:
    path = os.path.join(root, split)
    layout = f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
    if not os.path.isdir(path):
        raise DataError(f"imagefolder: {root} has no {split}/ folder ({layout})")
    folders = [e.name for e in _listing(path) if e.is_dir()]
    if not folders:
        raise DataError(f"imagefolder: {path} holds no class folders ({layout})")
    if classes is None:
        classes = folders
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for name in folders:
        if name not in index:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise DataError(f"imagefolder: {path}/{name} is not a class of {root}/train (its {len(classes)} classes: {shown})")
        found = _image_files(os.path.join(path, name), name)
        if not found:
            raise DataError(f"imagefolder: class folder {path}/{name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [index[name]] * len(found)
    return FolderSplit(
        root=path, files=np.array(files, dtype=object), labels=torch.tensor(labels, dtype=torch.int64), classes=tuple(classes)
    )


def load_image_folders(data_dir: str | None) -> tuple[FolderSplit, FolderSplit]:
    """``(train, val)`` of ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``; one-line DataError otherwise."""
    if not data_dir:
        raise DataError("imagefolder needs --data_dir DIR holding train/<class>/ and val/<class>/ image folders")
    root = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(root):
        raise DataError(f"imagefolder: data_dir {root} does not exist or is not a folder")
    train = _folder_split(root, "train", None)
    return train, _folder_split(root, "val", list(train.classes))
