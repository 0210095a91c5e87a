"""CIFAR-10 and CIFAR-100: torchvision's pickled batches or the Hub's parquet files."""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections.abc import Sequence

import numpy as np

from bench.data.datasets import DatasetInfo, check_labels, short_error
from bench.data.names import DataError
from bench.data.parquet import find_parquet, load_parquet_splits
from bench.data.sources import Findings, Root, Wanted, dedupe, download_allowed, find_archives

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


#: everything a CIFAR python batch may ask the unpickler for: a dict of bytes, lists and one numpy array
_ARRAY_PARTS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 2 writes bytes from Python 3
}


class RefusedPickle(pickle.UnpicklingError):
    """A file that asks the unpickler for something a CIFAR batch never holds."""


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR batch and nothing else: any other object a file names (a function to call, a class to
    build) is refused before it is looked up, so a planted file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_PARTS:
            raise RefusedPickle(f"it asks for {module}.{name}, which a CIFAR batch never holds")
        if name == "_reconstruct":  # numpy's own array rebuilders, wherever this numpy keeps them
            return np.zeros(1).__reduce_ex__(2)[0]
        if name == "_frombuffer":
            return np.zeros(1).__reduce_ex__(5)[0]
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def read_batch_pickle(data: bytes):
    """The object in a CIFAR python batch, unpickled with only the numpy array parts it needs."""
    return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()


def _read_cifar_batch(info: DatasetInfo, path: str) -> tuple[np.ndarray, np.ndarray]:
    spec = _CIFAR[info.name]
    try:
        with open(path, "rb") as f:
            entry = read_batch_pickle(f.read())
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[spec["label_key"]], dtype=np.int64)
        data = data.reshape(-1, 3, 32, 32)
    except KeyError as exc:
        raise DataError(f"{path}: missing key {exc} in the CIFAR pickle; is it the right dataset?") from None
    except RefusedPickle as exc:
        raise DataError(f"{path}: refused ({exc}); delete the folder and download again") from None
    except Exception as exc:
        raise DataError(f"cannot read {path} ({short_error(exc)}); delete the folder and download again") from None
    return data, check_labels(labels, data.shape[0], info.num_classes, path)


def _read_cifar_pickles(info: DatasetInfo, folder: str):
    spec = _CIFAR[info.name]
    out = []
    for split in ("train", "test"):
        batches = [_read_cifar_batch(info, os.path.join(folder, fname)) for fname in spec[split]]
        out.append((np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])))
    return out[0], out[1]


def _find_cifar_pickles(info: DatasetInfo, dirs: Sequence[str], found: Findings) -> str | None:
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


def _cifar_wanted(info: DatasetInfo, root: str, dirs: Sequence[str]) -> Wanted:
    spec = _CIFAR[info.name]
    return Wanted(
        what=f"{spec['folder']}/ or train*.parquet + test*.parquet",
        where=f" in {' or '.join(dirs)} (also under {spec['hub_sub']}/ or data/)",
        howto=(
            f"get it with `python -c \"import torchvision; torchvision.datasets.{spec['tv']}('{root}', download=True)\"` "
            f"or `huggingface-cli download {spec['hub']} --repo-type dataset --local-dir {os.path.join(root, info.name)}`"
        ),
    )


def load_cifar(info: DatasetInfo, root: Root, download: bool, cache_dir: str):
    spec = _CIFAR[info.name]
    dirs = dedupe([root.path, os.path.join(root.path, info.name)])
    found = Findings()
    folder = _find_cifar_pickles(info, dirs, found)
    if folder is not None:
        return _read_cifar_pickles(info, folder)
    columns = {"img", spec["label_col"]}
    subdirs = ["", spec["hub_sub"], "data"]
    files = find_parquet(dirs, subdirs, ("train*.parquet", "test*.parquet"), columns, found, [spec["hub_sub"]])
    if files is not None:
        return load_parquet_splits(info, files, "img", spec["label_col"], cache_dir)
    find_archives(dirs, spec["archive"], spec["folder"], found)

    wanted = _cifar_wanted(info, root.path, dirs)
    state = download_allowed(info, root, download, found, wanted)
    try:
        _torchvision_download(info.name, root.path)
    except Exception as exc:
        raise DataError(
            f"{info.display_name} not found: {state}; the download into {root.path} failed ({short_error(exc)}); {wanted.howto}"
        ) from None
    folder = _find_cifar_pickles(info, [root.path], Findings())
    if folder is None:
        raise DataError(
            f"{info.display_name}: the download into {root.path} finished but "
            f"{os.path.join(root.path, spec['folder'])} is incomplete; {wanted.howto}"
        )
    return _read_cifar_pickles(info, folder)
