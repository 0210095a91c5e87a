"""What a loader worker does to one image (decode, crop, flip, resize), and the loaders that run it."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.data.datasets import short_error
from bench.data.names import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_workers(processes: int = 1) -> int:
    """Decoding workers per process when ``--workers`` is not given: the cores left after one
    per process, shared among the processes, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, processes) - 1))


# -- what a worker does to one image ----------------------------------------------------------------


def _crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random resized crop: area 8% to 100% of the image, aspect ratio
    3/4 to 4/3 (log-uniform), up to 10 tries, else the largest centred crop within those ratios."""
    area = width * height
    log_low, log_high = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class View:
    """How a decoded image becomes a uint8 ``[3, image_size, image_size]`` tensor.

    ``train``: a random resized crop then a horizontal flip with probability 1/2, drawn (in that
    order) from ``numpy.random.default_rng([seed, epoch, index])``; otherwise the evaluation view
    (shorter side resized to ``image_size * 256 / 224``, centre crop).
    """

    image_size: int
    train: bool
    seed: int = 0
    epoch: int = 0

    def __call__(self, image, index: int) -> torch.Tensor:
        from PIL import Image

        size = self.image_size
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            left, top, w, h = _crop_box(image.width, image.height, rng)
            image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            short = int(size * 256 / 224)
            width, height = image.size
            if width <= height:
                new = (short, int(short * height / width))
            else:
                new = (int(short * width / height), short)
            image = image.resize(new, Image.Resampling.BILINEAR)
            top, left = int(round((new[1] - size) / 2)), int(round((new[0] - size) / 2))
            image = image.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _decode(image: Any, where: str):
    """A PIL RGB image from a file path or encoded bytes; DataError naming it otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
        with Image.open(source) as opened:
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        label = image if isinstance(image, str) else where
        raise DataError(f"cannot decode {label} ({short_error(exc)})") from None


@dataclass(frozen=True)
class _Failure:
    message: str


class _Decoder(torch.utils.data.Dataset):
    """What a loader's workers run: an item ``(index, image, label)`` handed out by a plan (the
    image a path or encoded bytes) becomes ``(view, label, index)``."""

    def __init__(self, view: View, where: str):
        self.view, self.where = view, where

    def __getitem__(self, item):
        index, image, label = item
        try:
            return self.view(_decode(image, f"{self.where} sample {index}"), index), label, index
        except DataError as err:  # re-raised in the training process as one line
            return _Failure(str(err))


def _collate(samples):
    failed = next((s for s in samples if isinstance(s, _Failure)), None)
    if failed is not None:
        return failed
    views, labels, indices = zip(*samples)
    return torch.stack(views), torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64)


class Plan:
    """The item lists a loader decodes, one per batch, made by ``make()`` when the loader starts."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def make_loader(plan: Plan, view: View, where: str, workers: int, device: torch.device) -> Iterator:
    loader = torch.utils.data.DataLoader(
        _Decoder(view, where),
        batch_sampler=plan,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        # the iterator draws its workers' base seed from this generator, not from the global RNG
        # (which a resumed run must find as the uninterrupted one left it)
        generator=torch.Generator(),
    )
    for batch in loader:
        if isinstance(batch, _Failure):
            raise DataError(batch.message)
        yield batch
