"""A run's training set: a fixed subset, label noise and a stratified validation split, in one fixed order."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from bench.data.datasets import ImageDataset
from bench.data.names import DataError

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
    val_fold: int = 0,
) -> PreparedData:
    """Apply a run's training-set options, in this order:

    1. ``subset`` (None: all images): the fixed subset of :func:`training_subset`;
    2. ``val_fraction`` in [0, 1) (0: no split): a held-out validation split,
       stratified by class and fixed by ``split_seed`` alone (see
       :func:`_validation_split`), so every run seed and optimizer sees the same one; ``val_fold``
       k holds out the k-th block of the split's order instead of the first (k-fold validation);
    3. ``label_noise`` in [0, 1) (0: none): :func:`with_label_noise` with the run
       ``seed``, on the remaining training part only; validation labels stay clean.

    With ``val_fraction`` 0 the result is exactly that of the ``training_subset`` and
    ``with_label_noise`` calls on their own. Bad arguments raise a one-line :class:`DataError`.
    The same applies to an image-folder dataset (``bench.data.loader.FolderSplit``): it selects
    file paths and labels instead of images.
    """
    for what, value in (("label_noise", label_noise), ("val_fraction", val_fraction)):
        if not 0 <= value < 1:
            raise DataError(f"{what} must be in [0, 1), got {value}")
    if subset is not None:
        train = training_subset(train, subset)
    val = None
    if val_fraction:
        train, val = _validation_split(train, val_fraction, split_seed, val_fold)
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


def _validation_split(data: ImageDataset, fraction: float, split_seed: int, fold: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """``(train, val)``: a stratified split holding out ``fraction`` of every class.

    A generator seeded with ``split_seed`` draws, in this order, a permutation of the
    classes (tie-break among equal remainders, see :func:`_validation_counts`) and a
    permutation of the images; each class, holding out ``n_c`` images, holds out its images
    ranked ``fold * n_c`` to ``(fold + 1) * n_c - 1`` in the latter (fold 0: those that come
    first; the last fold may hold fewer). Both parts keep the original image order.
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
    quota = take[permuted[by_class]]
    held[order.numpy()[by_class[(rank >= fold * quota) & (rank < (fold + 1) * quota)]]] = True
    if not held.any():
        raise DataError(f"val_fold {fold} of val_fraction {fraction} holds out no image of {data.name}; use a smaller val_fold")
    keep, out = torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))
    return _select(data, keep), _select(data, out)


def _select(data: ImageDataset, indices: torch.Tensor) -> ImageDataset:
    """The samples ``indices`` of ``data``; a dataset read from files (``bench.data.loader.FolderSplit``) selects its own."""
    if not isinstance(data, ImageDataset):
        return data.select(indices)
    return dataclasses.replace(data, images=data.images[indices].contiguous(), labels=data.labels[indices].contiguous())
