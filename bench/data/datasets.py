"""The in-memory datasets: what each is (:class:`DatasetInfo`), their names, and :class:`ImageDataset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.data.names import DataError


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, and its default augmentation (``bench.data.augment.default_augmentation``)."""

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
            raise ValueError(f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} {tuple(self.labels.shape)}")

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


# --------------------------------------------------------------------------- helpers


def make_dataset(info: DatasetInfo, images: Any, labels: Any) -> ImageDataset:
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


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_class_index(value) -> bool:
    """Whether one label is an integer (a Python or numpy one, not a bool): what a class index is."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_labels(labels: np.ndarray, n_images: int, num_classes: int, where: str) -> np.ndarray:
    """The labels as a writable int64 copy, checked: integers (not class names, fractions or missing values),
    one per image, each in [0, num_classes)."""
    given = np.asarray(labels).reshape(-1)
    if given.size and given.dtype.kind not in "iu":
        values = given.tolist()
        missing = sum(v is None or (isinstance(v, float) and v != v) for v in values)
        if missing:
            raise DataError(f"{where}: {missing} of {len(values)} labels are missing")
        odd = next((v for v in values if not (is_class_index(v) or (isinstance(v, float) and v.is_integer()))), None)
        if odd is not None:  # class names, fractions, booleans
            raise DataError(f"{where}: labels must be integer class indices, got {odd!r}")
    labels = given.astype(np.int64)
    if labels.shape[0] != n_images:
        raise DataError(f"{where}: {n_images} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels outside [0, {num_classes}) (min {labels.min()}, max {labels.max()}); is this the right dataset?"
        )
    return labels
