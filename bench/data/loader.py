"""Datasets larger than memory: read, decoded and augmented by ``DataLoader`` workers.

Two sources, one pipeline:

* ``--dataset imagefolder --data_dir DIR``: ``DIR/train/<class>/`` and ``DIR/val/<class>/``
  folders of images (``.jpg``, ``.jpeg``, ``.png``, ... in any case, also in sub-folders). The
  classes are the sorted names of the folders under ``train/``; ``val/`` may lack some of them
  but holds no other. Only the file list is kept in memory.
* ``--dataset hf:OWNER/NAME``: a Hugging Face Hub dataset streamed with
  ``datasets.load_dataset(OWNER/NAME, streaming=True)``: its ``train`` split for training and the
  first of ``validation``, ``valid``, ``val``, ``test`` for evaluation. The image column is the
  one with the ``Image`` feature (else one named ``image``, ``img``, ...), the label column the
  ``ClassLabel`` one (else ``label``, ``labels``, ...); ``--image_column`` / ``--label_column``
  name them. The split sizes come from the dataset's card, or are counted by reading the split
  once (the label column only, where the format allows).

Every image is decoded with PIL and converted to RGB in a worker (``--workers N``; 0 decodes in
the training process), then, for training, a random resized crop (scale 0.08 to 1, aspect ratio
3/4 to 4/3, torchvision's sampling rule, bilinear) to ``image_size`` and a horizontal flip with
probability 1/2; for evaluation a resize of the shorter side to ``image_size * 256 / 224`` and a
centre crop of ``image_size``. Workers return uint8 tensors; the training device normalises them
with the ImageNet mean and std.

Determinism:

* image folders: an epoch's order is ``bench.data.batches.epoch_order`` (a function of the seed and the
  epoch), and each sample's crop and flip are drawn from a generator seeded with (seed, epoch,
  sample index), so the batches do not depend on the number of workers or processes. A run resumed
  mid-epoch asks for its next step and the loader starts there: the images of the steps already
  taken are not read, and the run ends with the weights of an uninterrupted one.
* streamed hub datasets: an exact shuffle of a stream is impossible. An epoch reads the split with
  ``IterableDataset.shuffle(seed=epoch_seed(seed, epoch), buffer_size=SHUFFLE_BUFFER)``: the order
  of its shards is permuted, then the examples pass through a buffer of ``SHUFFLE_BUFFER`` from
  which they leave in a seeded random order. For the same dataset revision the order is a function
  of the seed and the epoch; the stream is read in the training process (workers only decode), so
  it does not depend on the number of workers either. Augmentation is seeded by (seed, epoch,
  position in the epoch). Resuming skips the samples of the steps taken (they are read, not
  decoded). Not deterministic: a dataset changed on the Hub between two runs (the revision is not
  pinned). Training subsets, validation splits, label noise and methods that index the training
  set by sample (a loss regulariser declaring needs_sample_ids) need random access and are refused.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator

import torch

from bench.data.augment import normalize
from bench.data.batches import epoch_seed
from bench.data.folders import FolderSplit, load_image_folders
from bench.data.hub import StreamSplit, open_hub_dataset
from bench.data.load import load_dataset_splits
from bench.data.names import DEFAULT_IMAGE_SIZE, HF_PREFIX, DataError, is_loader_dataset
from bench.data.prepare import PreparedData, prepare_train_set
from bench.data.views import Plan, View, default_workers, make_loader


def load_loader_splits(config) -> tuple[FolderSplit | StreamSplit, FolderSplit | StreamSplit]:
    """``(train, held-out)`` of a run's ``imagefolder`` or ``hf:`` dataset, made into views of ``config.image_size``."""
    if config.dataset == "imagefolder":
        splits = load_image_folders(config.data_dir)
    else:
        splits = open_hub_dataset(config.dataset[len(HF_PREFIX) :], config.image_column, config.label_column)
    size = config.image_size or DEFAULT_IMAGE_SIZE
    return tuple(dataclasses.replace(split, image_size=size) for split in splits)  # type: ignore[return-value]


# -- plans: which items each batch holds ----------------------------------------------------------------


def _train_plan(items: Iterator, start: int, steps: int, batch_size: int, rank: int, world: int, where: str):
    local = batch_size // world
    for i in range(start, steps):
        step = list(itertools.islice(items, batch_size))
        if len(step) < batch_size:
            raise DataError(f"{where}: the data ended at step {i} of {steps} (fewer examples than counted)")
        yield step[rank * local : (rank + 1) * local]


def eval_plan(items: Iterable, batch_size: int, rank: int, world: int):
    """Every ``world``-th batch from batch ``rank`` on, the evaluation's rule for every process."""
    items = iter(items)
    for b in itertools.count():
        chunk = list(itertools.islice(items, batch_size))
        if not chunk:
            return
        if b % world == rank:
            yield chunk


# -- what the training loop uses ----------------------------------------------------------------


class LoaderBatches:
    """:class:`bench.data.batches.TrainBatches` read through ``DataLoader`` workers.

    One loader per epoch, opened at the step asked for; it reads ahead, and its batches are
    handed out in order. Each process decodes only its own shard of a step's batch: the rows of
    ``x`` that belong to other processes are zeros, its labels 0 and ids -1 there
    (``one_step`` keeps its own shard).
    """

    def __init__(
        self,
        config,
        train_set: FolderSplit | StreamSplit,
        steps_per_epoch: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        workers: int | None = None,
    ):
        self.config, self.train_set, self.steps, self.device = config, train_set, steps_per_epoch, device
        self.rank, self.world = rank, world
        self.workers = default_workers(world) if workers is None else workers
        self._next: tuple[int, int] | None = None
        self._batches: Iterator | None = None

    def _open(self, epoch: int, start: int) -> None:
        self.close()
        seed, batch_size = epoch_seed(self.config.seed, epoch), self.config.batch_size
        name = self.train_set.name
        plan = Plan(
            lambda: _train_plan(
                self.train_set.items(seed, start * batch_size), start, self.steps, batch_size, self.rank, self.world, name
            )
        )
        view = View(self.train_set.image_size, train=True, seed=self.config.seed, epoch=epoch)
        self._batches = make_loader(plan, view, name, self.workers, self.device)
        self._next = (epoch, start)

    def batch(self, epoch: int, i: int):
        if self._next != (epoch, i):
            self._open(epoch, i)
        x, y, ids = next(self._batches)
        self._next = (epoch, i + 1)
        if i + 1 == self.steps:
            self.close()
        x = normalize(x.to(self.device, non_blocking=True), self.train_set.mean, self.train_set.std)
        y, ids = y.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True)
        if self.world == 1:
            return x, y, ids
        shard = slice(self.rank * len(y), (self.rank + 1) * len(y))
        whole = (self.config.batch_size,)
        full = (x.new_zeros(whole + tuple(x.shape[1:])), y.new_zeros(whole), ids.new_full(whole, -1))
        for target, part in zip(full, (x, y, ids)):
            target[shard] = part
        return full

    def close(self) -> None:
        batches, self._batches, self._next = self._batches, None, None
        if batches is not None:
            batches.close()  # ends the loader's iterator and its workers


def fixed_samples(
    data: FolderSplit | StreamSplit, samples: int, device: torch.device, workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` of ``data.items(seed=0)`` (for image folders the images an in-memory
    dataset would take: ``torch.randperm`` seeded with 0), in the evaluation view, normalised."""
    count = min(samples, len(data))
    plan = Plan(lambda: eval_plan(itertools.islice(data.items(seed=0), count), 256, 0, 1))
    parts = list(make_loader(plan, View(data.image_size, train=False), data.name, workers, device))
    x = torch.cat([p[0] for p in parts]).to(device)
    return normalize(x, data.mean, data.std), torch.cat([p[1] for p in parts]).to(device)


def run_splits(config) -> tuple:
    """``(train, test)`` of a run's dataset: whole tensors for an in-memory dataset, a split read by loader
    workers for an ``imagefolder`` or ``hf:`` one."""
    if is_loader_dataset(config.dataset):
        return load_loader_splits(config)
    return load_dataset_splits(config.dataset, config.data_dir)


def prepared_train_set(train_set, config) -> PreparedData:
    """A run's training-set options (subset, label noise, validation split) applied to ``train_set``."""
    return prepare_train_set(
        train_set,
        subset=config.train_subset,
        label_noise=config.label_noise,
        seed=config.seed,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        val_fold=config.val_fold,
    )
