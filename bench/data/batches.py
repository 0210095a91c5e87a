"""The training batches of a run: ``batch(epoch, i)`` is step ``i`` of epoch ``epoch``.

One interface, two implementations, so the training loop never asks where the images come from:

* :class:`MemoryBatches`: a dataset held as one uint8 tensor on the device
  (:class:`bench.data.ImageDataset`), augmented batch-wise on the device (:mod:`bench.data.augment`)
  with the run's augmentation generator, whose state the checkpoints keep;
* :class:`bench.data.loader.LoaderBatches`: images decoded and augmented by
  ``torch.utils.data.DataLoader`` workers, each sample's augmentation seeded by
  (seed, epoch, sample), so nothing but the position in the epoch needs keeping.

Both return the step's whole batch ``(x, y, ids)``: ``x`` normalised float images, ``y`` labels,
``ids`` the samples' indices into the training set, all on the device, in the epoch's order
(:func:`epoch_order`, a function of the seed and the epoch only). Under several processes each
keeps its own contiguous shard of it (``bench.loop.epoch.one_step``). Steps are asked for in order; an
implementation may be slower, never different, when asked out of order (a resumed run starts
mid-epoch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from bench.data.augment import Augmentation, augment, normalize
from bench.data.datasets import ImageDataset

if TYPE_CHECKING:
    from bench.config import RunConfig


class TrainBatches(Protocol):
    def batch(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``i``'s whole batch of epoch ``epoch``: normalised images, labels, sample ids."""
        ...

    def close(self) -> None:
        """Release what reading ahead holds (worker processes); the next ``batch`` reopens it."""
        ...


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's sample order."""
    return seed * 100_003 + epoch


def epoch_order(config: RunConfig, num_train: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch: a function of the seed and the epoch only (so resumable)."""
    return torch.randperm(num_train, generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch)))


def global_batch(train_set: ImageDataset, images, labels, order, i: int, batch_size: int, aug, generator):
    """Step ``i``'s whole batch, augmented and normalised, its labels and its sample ids (indices into
    the training set). Every process draws the augmentation of the whole batch and keeps its shard of
    all three, so what is trained on does not depend on the process count."""
    batch = order[i * batch_size : (i + 1) * batch_size]
    return normalize(augment(images[batch], aug, generator), train_set.mean, train_set.std), labels[batch], batch


class MemoryBatches:
    """:class:`TrainBatches` of an in-memory dataset, copied to ``device`` once."""

    def __init__(
        self, config: RunConfig, train_set: ImageDataset, device: torch.device, aug: Augmentation, generator: torch.Generator
    ):
        self.config, self.train_set, self.device, self.aug, self.generator = config, train_set, device, aug, generator
        self.images, self.labels = train_set.images.to(device), train_set.labels.to(device)
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def batch(self, epoch: int, i: int):
        if self._epoch != epoch:
            self._order = epoch_order(self.config, len(self.train_set), epoch).to(self.device)
            self._epoch = epoch
        return global_batch(
            self.train_set, self.images, self.labels, self._order, i, self.config.batch_size, self.aug, self.generator
        )

    def close(self) -> None:
        pass
