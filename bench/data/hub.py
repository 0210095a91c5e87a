"""Hugging Face Hub datasets streamed with ``datasets.load_dataset(..., streaming=True)``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from bench.data.datasets import is_class_index, short_error
from bench.data.names import DEFAULT_IMAGE_SIZE, DataError
from bench.data.parquet import quiet_datasets
from bench.data.views import IMAGENET_MEAN, IMAGENET_STD

#: Examples a streamed epoch shuffles among (raw encoded images, about 1 GB for ImageNet's JPEGs).
SHUFFLE_BUFFER = 10_000
EVAL_SPLITS = ("validation", "valid", "val", "test")
_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "picture")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "cls", "target")


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
            if not is_class_index(label) or not 0 <= label < self.num_classes:
                raise DataError(
                    f"{self.name}: example {position} has the label {label!r}, not a class in [0, {self.num_classes})"
                )
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


def _pick_column(
    what: str, given: str | None, features: dict[str, Any], typed: list[str], names: tuple[str, ...], where: str
) -> str:
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
    raise DataError(
        f"{where}: cannot tell the {what} column ({found} among its columns: {columns}); name it with --{what}_column"
    )


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
    integer = isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint"))
    if label_feature is not None and not (integer or isinstance(label_feature, datasets.ClassLabel)):
        raise DataError(f"{where}: column {label_column!r} holds {label_feature}, expected integer class indices")
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
            if not all(v is None or is_class_index(v) for v in labels):
                raise DataError(f"{where}: column {label_column!r} must hold integer class indices")
            known = [int(v) for v in labels if v is not None and v >= 0]
            num_classes = max(known) + 1 if known else 0
    if size == 0 or not num_classes:
        raise DataError(f"{where} is empty or has no labels")
    return StreamSplit(
        stream=stream,
        image_column=image_column,
        label_column=label_column,
        num_examples=size,
        num_classes=num_classes,
        name=f"hf:{repo} {split}",
    )


#: seconds to wait for a connection to the Hub before calling it unreachable
HUB_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why the Hub (``HF_ENDPOINT``, default huggingface.co) cannot be reached; None when it can, or when
    ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` asks for the local cache."""
    if any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or type(err).__name__}"
    return None


def open_hub_dataset(
    repo: str, image_column: str | None = None, label_column: str | None = None
) -> tuple[StreamSplit, StreamSplit]:
    """``(train, evaluation)`` of the hub dataset ``repo``, streamed (``datasets.load_dataset(repo, streaming=True)``)."""
    unreachable = hub_unreachable()
    if unreachable:  # fail in seconds, not after the client's retries
        raise DataError(
            f"hf:{repo}: the Hugging Face Hub cannot be reached ({unreachable}); with the dataset in the local cache, "
            "set HF_HUB_OFFLINE=1"
        )
    with quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(repo, streaming=True)
        except Exception as exc:
            raise DataError(f"hf:{repo}: cannot open the dataset ({short_error(exc)})") from None
        if not isinstance(dataset, datasets.IterableDatasetDict):
            raise DataError(f"hf:{repo}: expected a dataset with splits, got {type(dataset).__name__}")
        splits = list(dataset)
        held_out = next((s for s in EVAL_SPLITS if s in splits), None)
        if "train" not in splits or held_out is None:
            raise DataError(
                f"hf:{repo}: needs a train split and one of {', '.join(EVAL_SPLITS)}; it has {', '.join(splits) or 'none'}"
            )
        features = _features(dataset["train"])
        where = f"hf:{repo}"
        image = _pick_column(
            "image",
            image_column,
            features,
            [n for n, f in features.items() if isinstance(f, datasets.Image)],
            _IMAGE_NAMES,
            where,
        )
        label = _pick_column(
            "label",
            label_column,
            features,
            [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)],
            _LABEL_NAMES,
            where,
        )
        train = _stream_split(dataset, "train", repo, image, label, None)
        return train, _stream_split(dataset, held_out, repo, image, label, train.num_classes)
