"""The decoded-image cache: one safetensors file per dataset and source files, keyed by their paths, sizes and times."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bench.data.datasets import DatasetInfo, short_error

from ..io import atomic_path

_CACHE_FORMAT = 1  # bump to invalidate every cache file


def default_cache_dir() -> str:
    env = os.environ.get("SAM_BENCH_CACHE")
    return env if env else os.path.join(os.path.expanduser("~"), ".cache", "sam-bench")


# --------------------------------------------------------------------------- cache


def source_key(name: str, paths: Sequence[str], extra: str = "") -> str:
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
        warnings.warn(f"ignoring unreadable cache file {path} ({short_error(exc)})", stacklevel=3)
        return None
    return (t["train_images"], t["train_labels"]), (t["test_images"], t["test_labels"])


def _cache_save(path: str, train, test, sources: Sequence[str]) -> None:
    tensors = {
        "train_images": torch.as_tensor(train[0]).contiguous(),
        "train_labels": torch.as_tensor(train[1]).to(torch.int64).contiguous(),
        "test_images": torch.as_tensor(test[0]).contiguous(),
        "test_labels": torch.as_tensor(test[1]).to(torch.int64).contiguous(),
    }
    meta = {"format": str(_CACHE_FORMAT), "sources": json.dumps(list(sources)[:50])}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except OSError as exc:  # read-only / full cache dir: keep going without a cache
        warnings.warn(f"could not write the dataset cache {path} ({short_error(exc)})", stacklevel=3)


def cached(info: DatasetInfo, cache_dir: str, sources: Sequence[str], build, extra: str = ""):
    """Return ``build()`` (``((x, y), (x, y))`` as numpy/torch) through the safetensors cache."""
    try:
        key = source_key(info.name, sources, extra)
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
