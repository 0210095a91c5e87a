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

* image folders: an epoch's order is ``bench.batches.epoch_order`` (a function of the seed and the
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
import io
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .augment import normalize
from .batches import epoch_seed
from .data import DataError, _quiet_datasets, _short
from .evaluation import evaluate_batches

__all__ = [
    "DEFAULT_IMAGE_SIZE", "HF_PREFIX", "IMAGENET_MEAN", "IMAGENET_STD", "SHUFFLE_BUFFER", "FolderSplit", "LoaderBatches",
    "LoaderSplit", "StreamSplit", "View", "default_workers", "fixed_samples", "is_loader_dataset", "load_image_folders",
    "loader_dataset_name", "load_loader_splits", "open_hub_dataset",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
#: Examples a streamed epoch shuffles among (raw encoded images, about 1 GB for ImageNet's JPEGs).
SHUFFLE_BUFFER = 10_000
HF_PREFIX = "hf:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("validation", "valid", "val", "test")
_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "picture")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "cls", "target")


# -- names ---------------------------------------------------------------------------------------


def loader_dataset_name(name: str) -> str | None:
    """``"imagefolder"`` or ``"hf:OWNER/NAME"`` (the prefix and ``image-folder`` in any spelling);
    None for any other name. A hub id keeps its case."""
    text = str(name).strip()
    if text[: len(HF_PREFIX)].lower() == HF_PREFIX:
        repo = text[len(HF_PREFIX) :].strip()
        parts = repo.split("/")
        if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo):
            raise DataError(f"--dataset {text!r}: expected hf:OWNER/NAME, a Hugging Face Hub dataset id")
        return HF_PREFIX + repo
    if "".join(ch for ch in text.lower() if ch.isalnum()) == "imagefolder":
        return "imagefolder"
    return None


def is_loader_dataset(name: str) -> bool:
    try:
        return loader_dataset_name(name) is not None
    except DataError:
        return True


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
        raise DataError(f"cannot decode {label} ({_short(exc)})") from None


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


class _Plan:
    """The item lists a loader decodes, one per batch, made by ``make()`` when the loader starts."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def _loader(plan: _Plan, view: View, where: str, workers: int, device: torch.device) -> Iterator:
    loader = torch.utils.data.DataLoader(
        _Decoder(view, where), batch_sampler=plan, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda",
        # the iterator draws its workers' base seed from this generator, not from the global RNG
        # (which a resumed run must find as the uninterrupted one left it)
        generator=torch.Generator(),
    )
    for batch in loader:
        if isinstance(batch, _Failure):
            raise DataError(batch.message)
        yield batch


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
        raise DataError(f"imagefolder: cannot list {folder} ({_short(exc)})") from None


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
    return FolderSplit(root=path, files=np.array(files, dtype=object), labels=torch.tensor(labels, dtype=torch.int64),
                       classes=tuple(classes))


def load_image_folders(data_dir: str | None) -> tuple[FolderSplit, FolderSplit]:
    """``(train, val)`` of ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``; one-line DataError otherwise."""
    if not data_dir:
        raise DataError("imagefolder needs --data_dir DIR holding train/<class>/ and val/<class>/ image folders")
    root = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(root):
        raise DataError(f"imagefolder: data_dir {root} does not exist or is not a folder")
    train = _folder_split(root, "train", None)
    return train, _folder_split(root, "val", list(train.classes))


# -- streamed hub datasets ---------------------------------------------------------------------------


@dataclass(eq=False)
class StreamSplit:
    """One split of a streamed hub dataset (a ``datasets.IterableDataset`` whose images stay encoded)."""

    stream: Any
    image_column: str
    label_column: str
    num_examples: int
    num_classes: int
    name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    image_size: int = DEFAULT_IMAGE_SIZE  # the side of the views made of it

    def __len__(self) -> int:
        return self.num_examples

    def items(self, seed: int | None = None, start: int = 0) -> Iterator[tuple[int, Any, int]]:
        """``(position, encoded image, label)`` in stream order, or shuffled with ``seed`` (shard order
        and a buffer of ``SHUFFLE_BUFFER``); the first ``start`` are read but not decoded or handed out."""
        stream = self.stream.select_columns([self.image_column, self.label_column])
        if seed is not None:
            stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        for position, example in enumerate(stream):
            if position < start:
                continue
            label = example[self.label_column]
            if label is None or not 0 <= int(label) < self.num_classes:
                raise DataError(f"{self.name}: example {position} has the label {label!r}, outside [0, {self.num_classes})")
            yield position, self._encoded(example[self.image_column], position), int(label)

    def _encoded(self, value: Any, position: int):
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path") and os.path.isfile(value["path"]):
                return value["path"]
        elif isinstance(value, (bytes, bytearray)):
            return value
        raise DataError(f"{self.name}: example {position} of column {self.image_column!r} is not an encoded image")


def _pick_column(what: str, given: str | None, features: dict[str, Any], typed: list[str], names: tuple[str, ...],
                 where: str) -> str:
    columns = ", ".join(features)
    if given is not None:
        if given not in features:
            raise DataError(f"{where} has no column {given!r} (its columns: {columns})")
        return given
    candidates = typed or [n for n in names if n in features]
    if len(typed) > 1:
        preferred = [n for n in names if n in typed]
        candidates = preferred[:1] if preferred else typed
    if len(candidates) == 1 or (candidates and not typed):
        return candidates[0]
    found = f"several ({', '.join(candidates)})" if candidates else "none"
    raise DataError(f"{where}: cannot tell the {what} column ({found} among its columns: {columns}); "
                    f"name it with --{what}_column")


def _features(stream) -> dict[str, Any]:
    if stream.features is not None:
        return dict(stream.features)
    names = stream.column_names or list(next(iter(stream)).keys())
    return {n: None for n in names}


def _stream_split(dataset, split: str, repo: str, image_column: str, label_column: str, num_classes: int | None) -> StreamSplit:
    import datasets

    stream = dataset[split]
    where = f"hf:{repo} split {split}"
    features = _features(stream)
    for column in (image_column, label_column):
        if column not in features:
            raise DataError(f"{where} has no column {column!r} (its columns: {', '.join(features)})")
    if isinstance(features[image_column], datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    label_feature = features[label_column]
    if num_classes is None and isinstance(label_feature, datasets.ClassLabel):
        num_classes = label_feature.num_classes
    size = None
    splits = getattr(stream.info, "splits", None)
    if splits and split in splits and splits[split].num_examples:
        size = int(splits[split].num_examples)
    if size is None or num_classes is None:  # read the split once, its label column only
        labels = [example[label_column] for example in stream.select_columns([label_column])]
        size = len(labels) if size is None else size
        if num_classes is None:
            known = [int(v) for v in labels if v is not None and int(v) >= 0]
            num_classes = max(known) + 1 if known else 0
    if size == 0 or not num_classes:
        raise DataError(f"{where} is empty or has no labels")
    return StreamSplit(stream=stream, image_column=image_column, label_column=label_column, num_examples=size,
                       num_classes=num_classes, name=f"hf:{repo} {split}")


def open_hub_dataset(repo: str, image_column: str | None = None, label_column: str | None = None
                     ) -> tuple[StreamSplit, StreamSplit]:
    """``(train, evaluation)`` of the hub dataset ``repo``, streamed (``datasets.load_dataset(repo, streaming=True)``)."""
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(repo, streaming=True)
        except Exception as exc:
            raise DataError(f"hf:{repo}: cannot open the dataset ({_short(exc)})") from None
        if not isinstance(dataset, datasets.IterableDatasetDict):
            raise DataError(f"hf:{repo}: expected a dataset with splits, got {type(dataset).__name__}")
        splits = list(dataset)
        held_out = next((s for s in EVAL_SPLITS if s in splits), None)
        if "train" not in splits or held_out is None:
            raise DataError(f"hf:{repo}: needs a train split and one of {', '.join(EVAL_SPLITS)}; "
                            f"it has {', '.join(splits) or 'none'}")
        features = _features(dataset["train"])
        where = f"hf:{repo}"
        image = _pick_column("image", image_column, features,
                             [n for n, f in features.items() if isinstance(f, datasets.Image)], _IMAGE_NAMES, where)
        label = _pick_column("label", label_column, features,
                             [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)], _LABEL_NAMES, where)
        train = _stream_split(dataset, "train", repo, image, label, None)
        return train, _stream_split(dataset, held_out, repo, image, label, train.num_classes)


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


def _eval_plan(items: Iterable, batch_size: int, rank: int, world: int):
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
    """:class:`bench.batches.TrainBatches` read through ``DataLoader`` workers.

    One loader per epoch, opened at the step asked for; it reads ahead, and its batches are
    handed out in order. Each process decodes only its own shard of a step's batch: the rows of
    ``x`` that belong to other processes are zeros, its labels 0 and ids -1 there
    (``one_step`` keeps its own shard).
    """

    def __init__(self, config, train_set: FolderSplit | StreamSplit, steps_per_epoch: int, device: torch.device,
                 rank: int = 0, world: int = 1, workers: int | None = None):
        self.config, self.train_set, self.steps, self.device = config, train_set, steps_per_epoch, device
        self.rank, self.world = rank, world
        self.workers = default_workers(world) if workers is None else workers
        self._next: tuple[int, int] | None = None
        self._batches: Iterator | None = None

    def _open(self, epoch: int, start: int) -> None:
        self.close()
        seed, batch_size = epoch_seed(self.config.seed, epoch), self.config.batch_size
        name = self.train_set.name
        plan = _Plan(lambda: _train_plan(self.train_set.items(seed, start * batch_size), start, self.steps, batch_size,
                                         self.rank, self.world, name))
        view = View(self.train_set.image_size, train=True, seed=self.config.seed, epoch=epoch)
        self._batches = _loader(plan, view, name, self.workers, self.device)
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


@dataclass
class LoaderSplit:
    """A held-out split evaluated through the loader (the evaluation view), by the rule of
    :func:`bench.evaluation.evaluate`: process r evaluates batches r, r + world, ...; the sums
    are reduced once, by every process."""

    name: str
    data: FolderSplit | StreamSplit
    batch_size: int
    workers: int

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        plan = _Plan(lambda: _eval_plan(self.data.items(), self.batch_size, rank, world))
        loader = _loader(plan, View(self.data.image_size, train=False), self.data.name, self.workers, device)
        batches = ((normalize(x.to(device), self.data.mean, self.data.std), y.to(device)) for x, y, _ in loader)
        count = len(range(rank, -(-len(self.data) // self.batch_size), world))
        filler = torch.zeros(1, 3, self.data.image_size, self.data.image_size, device=device)
        return evaluate_batches(model, batches, len(self.data), accelerator, device, prefix=self.name, count=count,
                                filler=filler)


def fixed_samples(data: FolderSplit | StreamSplit, samples: int, device: torch.device,
                  workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` of ``data.items(seed=0)`` (for image folders the images an in-memory
    dataset would take: ``torch.randperm`` seeded with 0), in the evaluation view, normalised."""
    count = min(samples, len(data))
    plan = _Plan(lambda: _eval_plan(itertools.islice(data.items(seed=0), count), 256, 0, 1))
    parts = list(_loader(plan, View(data.image_size, train=False), data.name, workers, device))
    x = torch.cat([p[0] for p in parts]).to(device)
    return normalize(x, data.mean, data.std), torch.cat([p[1] for p in parts]).to(device)
