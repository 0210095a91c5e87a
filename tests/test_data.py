"""Tests for bench.data (dataset loading, training-set preparation) and bench.data.augment (batch augmentation).

Every fixture is written into tmp_path in the genuine on-disk formats; nothing
here needs the network or any shared data.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import bench.data.cifar
import bench.data.parquet
import bench.data.tinyimagenet
from bench.config import ConfigError, RunConfig
from bench.data.augment import Augmentation, augment, default_augmentation, normalize
from bench.data.cache import default_cache_dir
from bench.data.datasets import DATASET_INFO, ImageDataset, available_datasets, canonical_name
from bench.data.load import load_dataset_splits
from bench.data.names import DataError
from bench.data.prepare import PreparedData, prepare_train_set, training_subset, with_label_noise

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- fixture writers


def _rng_images(seed: int, n: int, c: int, size: int, low: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, 256, size=(n, c, size, size), dtype=np.uint8)


def write_cifar10_pickles(root, n_per_batch=20, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = _rng_images(i, n_per_batch, 3, 32)
        y = [(i + j) % 10 for j in range(n_per_batch)]
        entry = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": y,
            b"data": x.reshape(n_per_batch, 3072),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n_per_batch)],
        }
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(entry, f, protocol=2)
        xs.append(x)
        ys += y
    xt = _rng_images(99, n_test, 3, 32)
    yt = [j % 10 for j in range(n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt.reshape(n_test, 3072)}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n_per_batch}, f)
    return (np.concatenate(xs), np.array(ys)), (xt, np.array(yt))


def _write_cifar100_pickles(root, n_train=30, n_test=12):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for split, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        x = _rng_images(seed, n, 3, 32)
        fine = [(7 * j + seed) % 100 for j in range(n)]
        entry = {
            b"filenames": [b"x.png"] * n,
            b"batch_label": split.encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f % 20 for f in fine],
            b"data": x.reshape(n, 3072),
        }
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
        out.append((x, np.array(fine)))
    return out[0], out[1]


def _to_pil(chw: np.ndarray) -> PILImage.Image:
    if chw.shape[0] == 1:
        return PILImage.fromarray(chw[0], mode="L")
    return PILImage.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), mode="RGB")


def _write_hf_parquet(path, images: np.ndarray, labels, image_col: str, label_col: str, n_classes: int, extra=None):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    cols = {image_col: [_to_pil(im) for im in images], label_col: [int(v) for v in labels]}
    feats = {image_col: HFImage(), label_col: ClassLabel(names=[f"c{i}" for i in range(n_classes)])}
    for k, (vals, feat) in (extra or {}).items():
        cols[k] = vals
        feats[k] = feat
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Dataset.from_dict(cols, features=Features(feats)).to_parquet(str(path))


def _write_cifar10_parquet(folder, sub="plain_text", train_name="train-00000-of-00001.parquet", test_name=None):
    x, y = _rng_images(11, 24, 3, 32), np.arange(24) % 10
    xt, yt = _rng_images(12, 8, 3, 32), (np.arange(8) * 3) % 10
    d = folder / sub if sub else folder
    _write_hf_parquet(d / train_name, x, y, "img", "label", 10)
    _write_hf_parquet(d / (test_name or train_name.replace("train", "test")), xt, yt, "img", "label", 10)
    return (x, y), (xt, yt)


def _write_cifar100_parquet(folder):
    from datasets import ClassLabel

    x, y = _rng_images(21, 16, 3, 32), (np.arange(16) * 13) % 100
    xt, yt = _rng_images(22, 6, 3, 32), (np.arange(6) * 17) % 100
    for name, xx, yy in (("train", x, y), ("test", xt, yt)):
        coarse = ([int(v) % 20 for v in yy], ClassLabel(names=[f"k{i}" for i in range(20)]))
        _write_hf_parquet(
            folder / "cifar100" / f"{name}-00000-of-00001.parquet",
            xx,
            yy,
            "img",
            "fine_label",
            100,
            extra={"coarse_label": coarse},
        )
    return (x, y), (xt, yt)


def _write_tiny_folder(root):
    """tiny-imagenet-200 with 2 classes x 2 JPEGs (one grayscale) and 2 val images."""
    base = root / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # deliberately unsorted: class order is the sorted order
    (base).mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(3)
    expected_train = []
    for w in sorted(wnids):
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        boxes = []
        for k in range(2):
            name = f"{w}_{k}.JPEG"
            if k == 1 and w == "n02":
                PILImage.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(d / name)
            else:
                PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / name)
            boxes.append(f"{name}\t0\t0\t63\t63")
            expected_train.append((d / name, sorted(wnids).index(w)))
        (base / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    vdir = base / "val" / "images"
    vdir.mkdir(parents=True)
    ann = []
    expected_val = []
    for k, w in enumerate(["n02", "n01"]):
        name = f"val_{k}.JPEG"
        PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(vdir / name)
        ann.append(f"{name}\t{w}\t0\t0\t63\t63")
        expected_val.append((vdir / name, sorted(wnids).index(w)))
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    (base / "test" / "images").mkdir(parents=True)  # unlabeled test split of the original archive
    return expected_train, expected_val


def _pil_rgb_chw(path) -> np.ndarray:
    with PILImage.open(path) as im:
        return np.array(im.convert("RGB")).transpose(2, 0, 1)


# --------------------------------------------------------------------------- names and info


def test_available_and_aliases():
    assert available_datasets() == ["cifar10", "cifar100", "digits", "tinyimagenet"]
    for alias, name in [
        ("CIFAR10", "cifar10"),
        ("cifar-10", "cifar10"),
        ("CIFAR_100", "cifar100"),
        ("tiny-imagenet", "tinyimagenet"),
        ("TinyImageNet", "tinyimagenet"),
        ("tiny-imagenet-200", "tinyimagenet"),
        ("Digits", "digits"),
    ]:
        assert canonical_name(alias) == name


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as ei:
        load_dataset_splits("mnist", download=False)
    msg = str(ei.value)
    assert "mnist" in msg and "\n" not in msg
    for name in available_datasets():
        assert name in msg


def test_dataset_info_values():
    assert DATASET_INFO["cifar10"].mean == (0.4914, 0.4822, 0.4465)
    assert DATASET_INFO["cifar100"].std == (0.2673, 0.2564, 0.2762)
    assert DATASET_INFO["tinyimagenet"].num_classes == 200
    assert DATASET_INFO["tinyimagenet"].image_size == 64
    assert DATASET_INFO["digits"].channels == 1


# --------------------------------------------------------------------------- digits


def test_digits_split_and_stats():
    train, test = load_dataset_splits("digits", data_dir="/nonexistent/ignored", download=False)
    assert isinstance(train, ImageDataset)
    assert len(train) == 1437 and len(test) == 360
    assert train.images.shape == (1437, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.images.is_contiguous()
    assert train.num_classes == test.num_classes == 10 and train.name == "digits"
    # 0..16 mapped with round(v * 255 / 16)
    allowed = {int(np.rint(v * 255 / 16)) for v in range(17)}
    assert set(torch.unique(train.images).tolist()) <= allowed
    assert {0, 255} <= set(torch.unique(train.images).tolist())
    # stratified: every class keeps (almost) the same share in both splits
    tr_counts = torch.bincount(train.labels, minlength=10).double()
    te_counts = torch.bincount(test.labels, minlength=10).double()
    assert te_counts.min() >= 35 and te_counts.max() <= 37
    assert torch.allclose(tr_counts / 1437, te_counts / 360, atol=0.005)
    # the hard-coded normalisation is that of the train split
    px = train.images.double() / 255
    assert abs(px.mean().item() - train.mean[0]) < 1e-4
    assert abs(px.std(unbiased=False).item() - train.std[0]) < 1e-4
    assert train.mean == DATASET_INFO["digits"].mean == (0.3054,)
    assert train.std == DATASET_INFO["digits"].std == (0.3760,)
    # fixed split: a second load gives the same tensors
    train2, _ = load_dataset_splits("DIGITS")
    assert torch.equal(train.images, train2.images) and torch.equal(train.labels, train2.labels)


# --------------------------------------------------------------------------- CIFAR: torchvision pickles


@pytest.mark.parametrize("in_subdir", [False, True])
def test_cifar10_pickles(tmp_path, in_subdir):
    root = tmp_path / "cifar10" if in_subdir else tmp_path
    (x, y), (xt, yt) = write_cifar10_pickles(root)
    train, test = load_dataset_splits("CIFAR-10", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous() and test.images.is_contiguous()
    assert torch.equal(train.images, torch.from_numpy(x)) and torch.equal(train.labels, torch.from_numpy(y))
    assert torch.equal(test.images, torch.from_numpy(xt)) and torch.equal(test.labels, torch.from_numpy(yt))
    assert train.num_classes == 10 and train.mean == DATASET_INFO["cifar10"].mean and train.name == "cifar10"
    assert len(train) == 100


def test_cifar100_pickles(tmp_path):
    (x, y), (xt, yt) = _write_cifar100_pickles(tmp_path)
    train, test = load_dataset_splits("cifar100", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    assert torch.equal(train.images, torch.from_numpy(x)) and torch.equal(train.labels, torch.from_numpy(y))
    assert torch.equal(test.images, torch.from_numpy(xt)) and torch.equal(test.labels, torch.from_numpy(yt))
    assert train.num_classes == 100 and test.std == DATASET_INFO["cifar100"].std


def test_pickles_preferred_over_parquet(tmp_path):
    (x, _), _ = write_cifar10_pickles(tmp_path)
    _write_cifar10_parquet(tmp_path)
    train, _ = load_dataset_splits("cifar10", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    assert torch.equal(train.images, torch.from_numpy(x))


# --------------------------------------------------------------------------- CIFAR: Hugging Face parquet


@pytest.mark.parametrize(
    "layout",
    ["hub_plain_text", "flat_in_name_dir", "data_dir"],
)
def test_cifar10_parquet_layouts(tmp_path, layout):
    data = tmp_path / "data"
    if layout == "hub_plain_text":  # huggingface-cli download uoft-cs/cifar10 --local-dir data/cifar10
        expected = _write_cifar10_parquet(data / "cifar10", sub="plain_text")
    elif layout == "flat_in_name_dir":  # data/cifar10/{train,test}.parquet
        expected = _write_cifar10_parquet(data / "cifar10", sub="", train_name="train.parquet")
    else:
        expected = _write_cifar10_parquet(data, sub="data")
    before = sorted(p for p in data.rglob("*"))
    train, test = load_dataset_splits("cifar10", data_dir=str(data), download=False, cache_dir=str(tmp_path / "c"))
    (x, y), (xt, yt) = expected
    assert train.images.shape == (24, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous() and train.labels.dtype == torch.int64
    assert torch.equal(train.images, torch.from_numpy(x))  # PNG: exact round trip
    assert torch.equal(train.labels, torch.from_numpy(y))
    assert torch.equal(test.images, torch.from_numpy(xt)) and torch.equal(test.labels, torch.from_numpy(yt))
    assert sorted(p for p in data.rglob("*")) == before  # nothing written next to the data
    assert list((tmp_path / "c").glob("cifar10-*.safetensors"))


def test_cifar100_parquet(tmp_path):
    (x, y), (xt, yt) = _write_cifar100_parquet(tmp_path / "cifar100")
    train, test = load_dataset_splits("cifar-100", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    assert torch.equal(train.images, torch.from_numpy(x)) and torch.equal(train.labels, torch.from_numpy(y))
    assert torch.equal(test.images, torch.from_numpy(xt)) and torch.equal(test.labels, torch.from_numpy(yt))
    assert train.num_classes == 100


def test_cifar100_does_not_take_cifar10_parquet(tmp_path):
    _write_cifar10_parquet(tmp_path, sub="")
    with pytest.raises(DataError) as ei:
        load_dataset_splits("cifar100", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    msg = str(ei.value)
    assert "fine_label" in msg and "\n" not in msg


def test_parquet_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (x, y), _ = _write_cifar10_parquet(data)
    cache = tmp_path / "cache"
    first, _ = load_dataset_splits("cifar10", data_dir=str(data), download=False, cache_dir=str(cache))
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob(".tmp-*"))

    def boom(*a, **k):
        raise AssertionError("decoder called although the cache is valid")

    monkeypatch.setattr(bench.data.parquet, "decode_images", boom)
    second, test = load_dataset_splits("cifar10", data_dir=str(data), download=False, cache_dir=str(cache))
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    assert second.images.dtype == torch.uint8 and second.labels.dtype == torch.int64
    assert second.images.is_contiguous() and len(test) == 8

    # touching a source file changes the key: the data is decoded again
    src = data / "plain_text" / "train-00000-of-00001.parquet"
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoder called"):
        load_dataset_splits("cifar10", data_dir=str(data), download=False, cache_dir=str(cache))


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_BENCH_CACHE", str(tmp_path / "envcache"))
    assert default_cache_dir() == str(tmp_path / "envcache")
    _write_cifar10_parquet(tmp_path / "d")
    load_dataset_splits("cifar10", data_dir=str(tmp_path / "d"), download=False)
    assert list((tmp_path / "envcache").glob("cifar10-*.safetensors"))


def test_unwritable_cache_dir_still_loads(tmp_path):
    (x, _), _ = _write_cifar10_parquet(tmp_path / "d")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cache"):
        train, _ = load_dataset_splits("cifar10", data_dir=str(tmp_path / "d"), download=False, cache_dir=str(blocker / "sub"))
    assert torch.equal(train.images, torch.from_numpy(x))


def test_corrupt_cache_is_rebuilt(tmp_path):
    (x, _), _ = _write_cifar10_parquet(tmp_path / "d")
    cache = tmp_path / "c"
    load_dataset_splits("cifar10", data_dir=str(tmp_path / "d"), download=False, cache_dir=str(cache))
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        train, _ = load_dataset_splits("cifar10", data_dir=str(tmp_path / "d"), download=False, cache_dir=str(cache))
    assert torch.equal(train.images, torch.from_numpy(x))


# --------------------------------------------------------------------------- not found / download


def test_missing_cifar_without_download(tmp_path):
    with pytest.raises(DataError) as ei:
        load_dataset_splits("cifar10", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(tmp_path) in msg and os.path.join(str(tmp_path), "cifar10") in msg
    assert "cifar-10-batches-py" in msg and "huggingface-cli download uoft-cs/cifar10" in msg
    assert "download is off" in msg and f"{tmp_path} is empty" in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__ in (False, True)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    calls = []

    def no_network(name, root):
        calls.append((name, root))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(bench.data.cifar, "_torchvision_download", no_network)
    with pytest.raises(DataError) as ei:
        load_dataset_splits("cifar100", data_dir=str(tmp_path), download=True, cache_dir=str(tmp_path / "c"))
    msg = str(ei.value)
    assert calls == [("cifar100", str(tmp_path))]  # an existing empty data_dir is downloaded into
    assert "\n" not in msg and "failed" in msg and "name resolution" in msg and f"{tmp_path} is empty" in msg
    assert str(tmp_path) in msg and "uoft-cs/cifar100" in msg


def test_download_then_read_pickles(tmp_path, monkeypatch):
    expected = {}

    def fake_download(name, root):

        expected["data"] = write_cifar10_pickles(Path(root))

    monkeypatch.setattr(bench.data.cifar, "_torchvision_download", fake_download)
    train, test = load_dataset_splits("cifar10", data_dir=str(tmp_path), download=True, cache_dir=str(tmp_path / "c"))
    (x, y), (xt, _) = expected["data"]
    assert torch.equal(train.images, torch.from_numpy(x)) and torch.equal(test.images, torch.from_numpy(xt))


def test_missing_tinyimagenet(tmp_path, monkeypatch):
    def offline(repo_id):
        raise ConnectionError(f"cannot reach the hub for {repo_id}")

    monkeypatch.setattr(bench.data.tinyimagenet, "_hf_download", offline)
    with pytest.raises(DataError) as ei:
        load_dataset_splits("tiny-imagenet", data_dir=str(tmp_path), download=True, cache_dir=str(tmp_path / "c"))
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path) in msg and "zh-plus/tiny-imagenet" in msg and "cannot reach" in msg
    with pytest.raises(DataError, match="download is off"):
        load_dataset_splits("tinyimagenet", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))


# --------------------------------------------------------------------------- what is found where


@pytest.fixture
def downloads(monkeypatch):
    """Records every download attempt (torchvision and Hub) and fails it."""
    calls = []

    def tv(name, root):
        calls.append(("torchvision", name, root))
        raise urllib.error.URLError("offline")

    def hub(repo_id):
        calls.append(("hub", repo_id))
        raise ConnectionError("offline")

    monkeypatch.setattr(bench.data.cifar, "_torchvision_download", tv)
    monkeypatch.setattr(bench.data.tinyimagenet, "_hf_download", hub)
    return calls


def _load_error(name, data_dir, download=True, cache_dir=None) -> str:
    with pytest.raises(DataError) as ei:
        load_dataset_splits(name, data_dir=data_dir, download=download, cache_dir=cache_dir)
    msg = str(ei.value)
    assert "\n" not in msg and ei.value.__cause__ is None
    return msg


@pytest.mark.parametrize("name", ["cifar10", "tinyimagenet"])
@pytest.mark.parametrize("download", [True, False])
def test_missing_data_dir_creates_and_downloads_nothing(tmp_path, downloads, name, download):
    missing = tmp_path / "typo" / "data"
    msg = _load_error(name, str(missing), download, cache_dir=str(tmp_path / "c"))
    assert msg.startswith(f"data_dir {missing} does not exist") and "nothing was created" in msg
    assert ("torchvision" in msg) if name == "cifar10" else ("zh-plus/tiny-imagenet" in msg)
    assert downloads == [] and not (tmp_path / "typo").exists() and not (tmp_path / "c").exists()


def test_data_dir_that_is_a_file(tmp_path, downloads):
    (tmp_path / "f").write_text("x")
    assert "is not a folder" in _load_error("cifar10", str(tmp_path / "f"))
    assert downloads == []


def test_empty_data_dir(tmp_path, downloads):
    (tmp_path / ".DS_Store").write_text("")  # hidden entries do not count
    msg = _load_error("cifar10", str(tmp_path), download=False)
    assert f"CIFAR-10 not found: {tmp_path} is empty (expected cifar-10-batches-py/" in msg and "download is off" in msg
    assert downloads == []
    msg = _load_error("tinyimagenet", str(tmp_path), download=True)
    assert f"{tmp_path} is empty" in msg and "downloading zh-plus/tiny-imagenet failed (ConnectionError: offline)" in msg
    assert downloads == [("hub", "zh-plus/tiny-imagenet")]


@pytest.mark.parametrize("name", ["cifar100", "tinyimagenet"])
def test_unrelated_files_are_listed_and_not_downloaded_over(tmp_path, downloads, name):
    for f in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / f).write_text("x")
    (tmp_path / "notes").mkdir()
    msg = _load_error(name, str(tmp_path), download=True)
    assert f"{tmp_path} holds 3 files and 1 folder (a.txt, b.txt, c.txt, notes/) but no " in msg
    assert ("cifar-100-python/ or train*.parquet" in msg) if name == "cifar100" else ("tiny-imagenet-200/" in msg)
    assert "a download only goes into an empty data_dir" in msg
    assert downloads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt", "notes"]
    (tmp_path / "d.txt").write_text("x")
    (tmp_path / "e.txt").write_text("x")
    assert "holds 5 files and 1 folder (a.txt, b.txt, c.txt, d.txt, e.txt, ...)" in _load_error(name, str(tmp_path))


def test_default_data_dir(tmp_path, downloads, monkeypatch):
    """Without data_dir: ./data, which only a download creates, even when it holds other things."""
    monkeypatch.chdir(tmp_path)
    msg = _load_error("cifar10", None, download=False, cache_dir=str(tmp_path / "c"))
    assert f"{tmp_path / 'data'} (the default data_dir) does not exist" in msg and "download is off" in msg
    assert not (tmp_path / "data").exists()
    msg = _load_error("cifar10", None, download=True, cache_dir=str(tmp_path / "c"))
    assert downloads == [("torchvision", "cifar10", str(tmp_path / "data"))] and "CIFAR-10 not found" in msg
    write_cifar10_pickles(tmp_path / "data")  # another dataset in the shared default folder
    _load_error("cifar100", "", download=True, cache_dir=str(tmp_path / "c"))
    assert downloads[-1] == ("torchvision", "cifar100", str(tmp_path / "data"))


def test_corrupt_pickle_is_named_not_downloaded_over(tmp_path, downloads):
    write_cifar10_pickles(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])
    msg = _load_error("cifar10", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert msg.startswith(f"cannot read {batch} (") and "Error" in msg and downloads == []
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    assert "cannot reshape" in _load_error("cifar10", str(tmp_path))


def test_incomplete_pickle_folder_is_not_downloaded_over(tmp_path, downloads):
    write_cifar10_pickles(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").unlink()
    msg = _load_error("cifar10", str(tmp_path))
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    assert msg.startswith(f"CIFAR-10: {folder} is incomplete (missing data_batch_3, test_batch;") and downloads == []


def test_unextracted_archive_is_not_downloaded_over(tmp_path, downloads):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b partial")
    msg = _load_error("cifar100", str(tmp_path))
    assert f"{tmp_path / 'cifar-100-python.tar.gz'} was never extracted" in msg and downloads == []
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"PK")
    assert "tiny-imagenet-200.zip was never extracted" in _load_error("tinyimagenet", str(tmp_path))
    assert downloads == []


def test_unreadable_parquet_is_named(tmp_path, downloads):
    _write_cifar10_parquet(tmp_path)
    train = tmp_path / "plain_text" / "train-00000-of-00001.parquet"
    good = train.read_bytes()
    train.write_bytes(good[: len(good) // 2])  # truncated: no footer
    msg = _load_error("cifar10", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert msg.startswith(f"CIFAR-10: cannot read {train} (") and downloads == []
    broken = bytearray(good)
    broken[4:204] = b"\xff" * 200  # the footer (schema) reads, the first data page does not
    train.write_bytes(bytes(broken))
    msg = _load_error("cifar10", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert msg.startswith(f"CIFAR-10: cannot read {train} (") and downloads == []


def test_parquet_with_wrong_columns(tmp_path, downloads):
    """In a folder named for the dataset: a broken copy. Elsewhere: reported next to what is missing."""
    x, y = _rng_images(1, 2, 3, 32), [0, 1]
    for split in ("train", "test"):
        _write_hf_parquet(tmp_path / "cifar10" / f"{split}.parquet", x, y, "image", "label", 10)
    msg = _load_error("cifar10", str(tmp_path))
    assert (
        msg.startswith(
            f"CIFAR-10: {tmp_path / 'cifar10' / 'train.parquet'} has the columns ['image', 'label'], expected ['img', 'label']"
        )
        and downloads == []
    )
    # the same files in data/ (where zh-plus/tiny-imagenet keeps its own) only add to the not-found message
    (tmp_path / "cifar10").rename(tmp_path / "data")
    msg = _load_error("cifar10", str(tmp_path), download=False)
    assert "CIFAR-10 not found" in msg and "has the columns ['image', 'label'], expected ['img', 'label']" in msg


def test_parquet_with_one_split_only(tmp_path, downloads):
    _write_cifar10_parquet(tmp_path)
    (tmp_path / "plain_text" / "test-00000-of-00001.parquet").unlink()
    msg = _load_error("cifar10", str(tmp_path))
    assert f"{tmp_path / 'plain_text'} has train*.parquet but no test*.parquet files" in msg and downloads == []


def test_incomplete_tiny_folder(tmp_path, downloads):
    _write_tiny_folder(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    (base / "val" / "val_annotations.txt").unlink()
    msg = _load_error("tinyimagenet", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert msg.startswith(f"Tiny-ImageNet: {base} is incomplete (no {base / 'val' / 'val_annotations.txt'})")
    assert downloads == []


def test_corrupt_tiny_files_are_named(tmp_path, downloads):
    exp_train, _ = _write_tiny_folder(tmp_path)
    jpeg = exp_train[1][0]
    jpeg.write_bytes(b"not a jpeg")
    msg = _load_error("tinyimagenet", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert f"cannot decode {jpeg} (" in msg and downloads == []
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_bytes(b"\xff\xfe\x00bad")
    msg = _load_error("tinyimagenet", str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert msg.startswith(f"Tiny-ImageNet: cannot read {tmp_path / 'tiny-imagenet-200' / 'wnids.txt'} (UnicodeDecodeError")


# --------------------------------------------------------------------------- Tiny-ImageNet


def test_tinyimagenet_folder(tmp_path, monkeypatch):
    exp_train, exp_val = _write_tiny_folder(tmp_path)
    cache = tmp_path / "c"
    train, test = load_dataset_splits("tiny-imagenet", data_dir=str(tmp_path), download=False, cache_dir=str(cache))
    assert train.images.shape == (4, 3, 64, 64) and test.images.shape == (2, 3, 64, 64)
    assert train.images.dtype == torch.uint8 and train.num_classes == 200
    assert train.labels.tolist() == [lbl for _, lbl in exp_train]
    assert test.labels.tolist() == [lbl for _, lbl in exp_val]
    for i, (path, _) in enumerate(exp_train):  # JPEG: compare with PIL's decode (grayscale -> RGB)
        assert torch.equal(train.images[i], torch.from_numpy(_pil_rgb_chw(path)))
    for i, (path, _) in enumerate(exp_val):
        assert torch.equal(test.images[i], torch.from_numpy(_pil_rgb_chw(path)))
    gray = train.images[3]  # n02_1 (last in class order) is grayscale: the three channels are equal
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])

    monkeypatch.setattr(
        bench.data.tinyimagenet, "decode_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded"))
    )
    train2, _ = load_dataset_splits("tinyimagenet", data_dir=str(tmp_path / "tiny-imagenet-200"), cache_dir=str(cache))
    assert torch.equal(train2.images, train.images)


def test_tinyimagenet_parquet(tmp_path):
    x, y = _rng_images(31, 6, 3, 64), np.array([0, 5, 199, 7, 7, 1])
    xt, yt = _rng_images(32, 3, 3, 64), np.array([3, 2, 1])
    gray = _rng_images(33, 1, 1, 64)
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    feats = Features({"image": HFImage(), "label": ClassLabel(names=[f"n{i:03d}" for i in range(200)])})
    (tmp_path / "data").mkdir()
    imgs = [_to_pil(im) for im in x[:-1]] + [_to_pil(gray[0])]  # last train image is grayscale
    Dataset.from_dict({"image": imgs, "label": y.tolist()}, features=feats).to_parquet(
        str(tmp_path / "data" / "train-00000-of-00001.parquet")
    )
    Dataset.from_dict({"image": [_to_pil(im) for im in xt], "label": yt.tolist()}, features=feats).to_parquet(
        str(tmp_path / "data" / "valid-00000-of-00001.parquet")
    )
    train, test = load_dataset_splits("tinyimagenet", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    assert torch.equal(train.images[:5], torch.from_numpy(x[:5]))
    assert torch.equal(train.images[5], torch.from_numpy(gray[0]).expand(3, 64, 64))
    assert torch.equal(train.labels, torch.from_numpy(y)) and torch.equal(test.labels, torch.from_numpy(yt))
    assert torch.equal(test.images, torch.from_numpy(xt))


def test_wrong_image_size_is_a_data_error(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    feats = Features({"img": HFImage(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    for split in ("train", "test"):
        img = PILImage.fromarray(np.zeros((28, 28, 3), np.uint8))
        Dataset.from_dict({"img": [img], "label": [1]}, features=feats).to_parquet(str(tmp_path / f"{split}.parquet"))
    with pytest.raises(DataError, match="expected 32x32"):
        load_dataset_splits("cifar10", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))


# --------------------------------------------------------------------------- training-set preparation


def _indexed_dataset(counts, num_classes=None) -> ImageDataset:
    """Image i holds i (two uint8 pixels, so the indices survive any selection); labels by ``counts``."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(123))]  # classes interleaved
    idx = torch.arange(len(labels))
    images = torch.stack([idx // 256, idx % 256], 1).to(torch.uint8).view(-1, 1, 1, 2)
    return ImageDataset(images, labels, num_classes or len(counts), (0.5,), (0.5,), "toy")


def _indices(data: ImageDataset) -> torch.Tensor:
    return data.images.view(-1, 2).to(torch.int64) @ torch.tensor([256, 1])


def test_prepare_without_split_is_the_old_two_calls():
    data = _indexed_dataset([40, 25, 30, 5])
    for subset, noise, seed in [(None, 0.0, 0), (60, 0.0, 1), (None, 0.3, 2), (60, 0.25, 7)]:
        prepared = prepare_train_set(data, subset=subset, label_noise=noise, seed=seed)
        assert isinstance(prepared, PreparedData) and prepared.val is None
        old, noisy = (training_subset(data, subset) if subset else data), None
        if noise:
            old, noisy = with_label_noise(old, noise, seed)
        assert torch.equal(prepared.train.images, old.images) and torch.equal(prepared.train.labels, old.labels)
        assert (prepared.noisy_indices is None) == (noisy is None)
        if noisy is not None:
            assert torch.equal(prepared.noisy_indices, noisy)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.7])
def test_validation_split_is_stratified_and_disjoint(fraction):
    counts = [50, 37, 11, 6, 3, 2, 90, 23]
    data = _indexed_dataset(counts)
    prepared = prepare_train_set(data, subset=None, label_noise=0.0, seed=0, val_fraction=fraction, split_seed=3)
    train, val = prepared.train, prepared.val
    tr, va = _indices(train), _indices(val)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and sorted(tr.tolist() + va.tolist()) == list(range(len(data)))
    assert torch.equal(tr, tr.sort().values) and torch.equal(va, va.sort().values)  # original order kept
    assert torch.equal(train.labels, data.labels[tr]) and torch.equal(val.labels, data.labels[va])
    val_counts = torch.bincount(val.labels, minlength=len(counts))
    train_counts = torch.bincount(train.labels, minlength=len(counts))
    for c, n in enumerate(counts):
        assert abs(int(val_counts[c]) - fraction * n) < 1, (c, n, int(val_counts[c]))  # floor or ceil
        assert train_counts[c] >= 1
    assert len(val) == round(fraction * len(data))
    assert val.num_classes == data.num_classes and val.name == data.name and val.images.is_contiguous()


def test_validation_folds_partition_each_class_and_fold_0_is_the_plain_split():
    """k-fold validation: folds 0 .. k-1 of val_fraction 1/k hold out disjoint blocks of every class that
    together cover it (here every class divides by 3); fold 0 is the split without a fold."""
    counts = [30, 12, 9, 3]
    data = _indexed_dataset(counts)
    kw = dict(subset=None, label_noise=0.0, seed=0, val_fraction=1 / 3, split_seed=4)
    folds = [prepare_train_set(data, **kw, val_fold=k) for k in range(3)]
    held = [_indices(fold.val).tolist() for fold in folds]
    assert sorted(sum(held, [])) == list(range(len(data)))  # disjoint, and every image is validated once
    for fold in folds:
        assert torch.bincount(fold.val.labels, minlength=4).tolist() == [n // 3 for n in counts]
        assert sorted(_indices(fold.train).tolist() + _indices(fold.val).tolist()) == list(range(len(data)))
    plain = prepare_train_set(data, **kw)
    assert torch.equal(plain.val.images, folds[0].val.images) and torch.equal(plain.train.images, folds[0].train.images)


def test_a_fold_past_the_split_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^val_fold 3 needs val_fraction > 0 and val_fold < 1 / val_fraction"):
        RunConfig(val_fraction=1 / 3, val_fold=3).validate()
    with pytest.raises(ConfigError, match=r"^val_fold 1 needs val_fraction > 0"):
        RunConfig(val_fold=1).validate()
    RunConfig(val_fraction=1 / 3, val_fold=2).validate()
    assert "val_fold" not in RunConfig().identity() and RunConfig(val_fraction=0.5, val_fold=1).identity()["val_fold"] == 1


def test_many_small_classes_get_the_exact_total():
    """100 classes of 5 images at 10%: 50 classes hold out one image, not every class (per-class rounding)."""
    data = _indexed_dataset([5] * 100)
    val = prepare_train_set(data, subset=None, label_noise=0.0, seed=0, val_fraction=0.1).val
    assert len(val) == 50 and torch.bincount(val.labels, minlength=100).max() == 1


def test_validation_split_depends_on_split_seed_only():
    data = _indexed_dataset([30, 30, 20, 20])
    kw = dict(subset=70, val_fraction=0.2, label_noise=0.4)
    a = prepare_train_set(data, seed=0, split_seed=5, **kw)
    b = prepare_train_set(data, seed=0, split_seed=5, **kw)
    c = prepare_train_set(data, seed=9, split_seed=5, **kw)
    d = prepare_train_set(data, seed=0, split_seed=6, **kw)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)  # deterministic
    assert torch.equal(a.val.images, c.val.images) and torch.equal(a.val.labels, c.val.labels)  # run seed: same split
    assert torch.equal(a.train.images, c.train.images) and not torch.equal(a.train.labels, c.train.labels)
    assert not torch.equal(a.val.images, d.val.images)
    subset = training_subset(data, 70)
    assert set(_indices(a.train).tolist()) | set(_indices(a.val).tolist()) == set(_indices(subset).tolist())


def test_label_noise_only_on_the_training_part():
    data = _indexed_dataset([40, 40, 40])
    p = prepare_train_set(data, subset=None, label_noise=0.5, seed=4, val_fraction=0.25, split_seed=0)
    assert torch.equal(p.val.labels, data.labels[_indices(p.val)])  # clean
    clean = data.labels[_indices(p.train)]
    assert torch.equal((p.train.labels != clean).nonzero().flatten(), p.noisy_indices)
    assert len(p.noisy_indices) == round(0.5 * len(p.train))
    split_only = prepare_train_set(data, subset=None, label_noise=0.0, seed=4, val_fraction=0.25)
    expected, changed = with_label_noise(split_only.train, 0.5, 4)
    assert torch.equal(p.train.labels, expected.labels) and torch.equal(p.noisy_indices, changed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(val_fraction=1.0), "val_fraction must be in [0, 1), got 1.0"),
        (dict(val_fraction=-0.1), "val_fraction must be in [0, 1), got -0.1"),
        (dict(val_fraction=float("nan")), "val_fraction must be in [0, 1), got nan"),
        (dict(label_noise=1.0), "label_noise must be in [0, 1), got 1.0"),
        (dict(subset=0), "train_subset must be in [1, 16] for toy, got 0"),
        (dict(val_fraction=0.01), "val_fraction 0.01 of the 16 training images of toy holds out no image"),
        (dict(val_fraction=0.9), "val_fraction 0.9 would leave class 3 of toy (2 images) without a training image"),
    ],
)
def test_bad_preparation_arguments(kwargs, message):
    data = _indexed_dataset([4, 4, 6, 2])
    args = dict(subset=None, label_noise=0.0, seed=0) | kwargs
    with pytest.raises(DataError) as ei:
        prepare_train_set(data, **args)
    assert message in str(ei.value) and "\n" not in str(ei.value)


def test_a_class_keeps_its_last_training_image():
    """A class of 2 at 50% holds out one image; classes of 1 hold out none while others can."""
    data = _indexed_dataset([2, 1, 1, 9])
    p = prepare_train_set(data, subset=None, label_noise=0.0, seed=0, val_fraction=0.4)
    assert torch.bincount(p.val.labels, minlength=4).tolist() == [1, 0, 0, 4]  # 5 = round(0.4 * 13)
    assert torch.bincount(p.train.labels, minlength=4).tolist() == [1, 1, 1, 5]


# --------------------------------------------------------------------------- augmentation


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx], zero outside."""
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, ye = max(0, -dy), min(H, H - dy)
    xs, xe = max(0, -dx), min(W, W - dx)
    if ys < ye and xs < xe:
        out[..., ys:ye, xs:xe] = x[..., ys + dy : ye + dy, xs + dx : xe + dx]
    return out


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _nonzero_batch(b=16, c=3, h=32, w=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8).to(device)


def test_default_augmentation():
    shape = lambda a: (a.crop_padding, a.flip, a.cutout)  # noqa: E731
    assert shape(default_augmentation("cifar10")) == (4, True, 0)
    assert shape(default_augmentation("CIFAR-100", cutout=True)) == (4, True, 16)
    assert shape(default_augmentation("tiny-imagenet")) == (8, True, 0)
    assert default_augmentation("tinyimagenet", cutout=True).cutout == 32
    assert shape(default_augmentation("digits")) == (1, False, 0)
    assert shape(default_augmentation("digits", cutout=True)) == (1, False, 4)
    assert default_augmentation(DATASET_INFO["cifar10"], cutout=True) == default_augmentation("cifar10", cutout=True)
    info = DATASET_INFO["tinyimagenet"]
    assert shape(default_augmentation(info)) == (info.crop_padding, info.flip, 0)


def test_cutout_is_zero_after_normalisation():
    """The blanked square holds the mean pixel, i.e. zero in normalised space, as in DeVries & Taylor."""
    aug = default_augmentation("cifar10", cutout=True)
    x = _nonzero_batch()
    out = normalize(
        augment(x, Augmentation(0, False, 16, aug.cutout_fill), _gen("cpu", 0)),
        DATASET_INFO["cifar10"].mean,
        DATASET_INFO["cifar10"].std,
    )
    changed = (augment(x, Augmentation(0, False, 16, aug.cutout_fill), _gen("cpu", 0)) != x).any(1)
    assert changed.any() and out.permute(1, 0, 2, 3)[:, changed].abs().max() < 0.01


def test_bad_augmentation_settings():
    with pytest.raises(DataError):
        default_augmentation("imagenet")
    with pytest.raises(ValueError):
        Augmentation(crop_padding=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_augment_shape_dtype_determinism(device):
    x = _nonzero_batch(device=device)
    x_copy = x.clone()
    aug = Augmentation(crop_padding=4, flip=True, cutout=8)
    a = augment(x, aug, _gen(device, 123))
    b = augment(x, aug, _gen(device, 123))
    c = augment(x, aug, _gen(device, 124))
    assert a.shape == x.shape and a.dtype == torch.uint8 and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, x_copy)  # input untouched
    # a generator continues its stream: two calls differ, and resuming from a saved state repeats
    g = _gen(device, 5)
    state = g.get_state()
    first, second = augment(x, aug, g), augment(x, aug, g)
    assert not torch.equal(first, second)
    g.set_state(state)
    assert torch.equal(augment(x, aug, g), first)
    # identity augmentation returns a copy
    ident = augment(x, Augmentation(0, False, 0), _gen(device, 0))
    assert torch.equal(ident, x) and ident.data_ptr() != x.data_ptr()
    # empty batch
    assert augment(x[:0], aug, _gen(device, 0)).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p, flip, cut, fill", [(2, True, 5, ()), (0, True, 3, (7, 8, 9)), (3, False, 0, ()), (0, False, 4, ())])
def test_augment_follows_the_documented_random_order(device, p, flip, cut, fill):
    """Rebuild each sample by hand from the draws in the documented order: crop rows, crop columns,
    flips, cutout rows, cutout columns (only for the enabled parts)."""
    x = _nonzero_batch(b=6, h=7, w=9, seed=5, device=device)
    B, C, H, W = x.shape
    out = augment(x, Augmentation(p, flip, cut, fill), _gen(device, 11))
    g = _gen(device, 11)
    draw = lambda hi: torch.randint(0, hi, (B,), generator=g, device=device).tolist()  # noqa: E731
    oy, ox = (draw(2 * p + 1), draw(2 * p + 1)) if p else ([p] * B, [p] * B)
    flips = (torch.rand(B, generator=g, device=device) < 0.5).tolist() if flip else [False] * B
    cy, cx = (draw(H), draw(W)) if cut else (None, None)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(B):
        expected = padded[i, :, oy[i] : oy[i] + H, ox[i] : ox[i] + W]
        expected = expected.flip(-1) if flips[i] else expected.clone()
        if cut:
            ys, xs = (
                slice(max(cy[i] - cut // 2, 0), max(cy[i] - cut // 2 + cut, 0)),
                slice(max(cx[i] - cut // 2, 0), max(cx[i] - cut // 2 + cut, 0)),
            )
            for ch in range(C):
                expected[ch, ys, xs] = fill[ch] if fill else 0
        assert torch.equal(out[i], expected), i


@pytest.mark.parametrize("device", DEVICES)
def test_crop_shifts_by_at_most_padding(device):
    p = 3
    x = _nonzero_batch(b=64, h=12, w=10, seed=1, device=device)
    out = augment(x, Augmentation(crop_padding=p, flip=False, cutout=0), _gen(device, 7))
    seen = set()
    for i in range(x.shape[0]):
        matches = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1) if torch.equal(out[i], _shift(x[i], dy, dx))]
        assert len(matches) == 1, f"sample {i} is not a shift of at most {p}"
        seen.add(matches[0])
    ys = {dy for dy, _ in seen}
    xs = {dx for _, dx in seen}
    assert ys == set(range(-p, p + 1)) and xs == set(range(-p, p + 1))  # the whole range is used


@pytest.mark.parametrize("device", DEVICES)
def test_flip_mirrors_exactly(device):
    x = _nonzero_batch(b=64, seed=2, device=device)
    out = augment(x, Augmentation(crop_padding=0, flip=True, cutout=0), _gen(device, 8))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(64)])
    same = torch.tensor([torch.equal(out[i], x[i]) for i in range(64)])
    assert bool((flipped ^ same).all())
    assert 10 < int(flipped.sum()) < 54


@pytest.mark.parametrize("device", DEVICES)
def test_crop_and_flip_together(device):
    p = 2
    x = _nonzero_batch(b=32, h=9, w=9, seed=3, device=device)
    out = augment(x, Augmentation(crop_padding=p, flip=True, cutout=0), _gen(device, 9))
    for i in range(32):
        ok = any(
            torch.equal(out[i], _shift(src, dy, dx))
            for src in (x[i], x[i].flip(-1))
            for dy in range(-p, p + 1)
            for dx in range(-p, p + 1)
        )
        assert ok, f"sample {i} is not a (flipped) shift"


@pytest.mark.parametrize("device", DEVICES)
def test_cutout_square(device):
    s = 8
    x = _nonzero_batch(b=128, h=32, w=32, seed=4, device=device)
    out = augment(x, Augmentation(crop_padding=0, flip=False, cutout=s), _gen(device, 10))
    zero = out == 0
    assert torch.equal(out[~zero], x[~zero])  # only zeroing happens
    inside = 0
    for i in range(128):
        m = zero[i]
        assert torch.equal(m[0], m[1]) and torch.equal(m[1], m[2])  # same square on all channels
        rows = m[0].any(1).nonzero().flatten()
        cols = m[0].any(0).nonzero().flatten()
        assert len(rows) > 0, "cutout always removes something"
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        assert int(m[0].sum()) == (r1 - r0) * (c1 - c0)  # a filled rectangle
        assert s // 2 <= r1 - r0 <= s and s // 2 <= c1 - c0 <= s
        if 0 < r0 and r1 < 32 and 0 < c0 and c1 < 32:
            assert (r1 - r0, c1 - c0) == (s, s)  # fully inside: exactly s x s
            inside += 1
    assert inside > 30


@pytest.mark.parametrize("device", DEVICES)
def test_normalize(device):
    x = _nonzero_batch(b=4, device=device)
    mean, std = DATASET_INFO["cifar10"].mean, DATASET_INFO["cifar10"].std
    y = normalize(x, mean, std)
    ref = (x.double() / 255 - torch.tensor(mean, device=device, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, device=device, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert y.dtype == torch.float32 and y.device == x.device and y.shape == x.shape
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert normalize(x, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.allclose(normalize(x[0], mean, std).double(), ref[0], atol=1e-5)
    with pytest.raises(ValueError):
        normalize(x, (0.5,), (0.5,))


def test_generator_on_wrong_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _nonzero_batch(device="cuda")
    with pytest.raises(ValueError, match="generator"):
        augment(x, Augmentation(), torch.Generator().manual_seed(0))


def test_no_augment_trains_on_the_images_as_they_are():
    """--no_augment: every training batch is its images, normalised, untouched (no crop, no flip); the default
    crops and flips them; with --cutout it is refused in one line."""
    from types import SimpleNamespace

    from bench.loop.setup import data_access

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = ImageDataset(images, torch.arange(40) % 2, 2, (0.5,) * 3, (0.25,) * 3, "cifar10")
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    first = {}
    for no_augment in (True, False):
        config = RunConfig(dataset="cifar10", batch_size=40, no_augment=no_augment).validate()
        batches, _ = data_access(config, accelerator, data, [], 1, torch.Generator().manual_seed(0))
        images, _, ids = batches.batch(0, 0)
        first[no_augment] = torch.equal(images, normalize(data.images[ids], data.mean, data.std))
    assert first == {True: True, False: False}
    with pytest.raises(ConfigError, match=r"^no_augment and cutout: cutout is an augmentation; choose one$"):
        RunConfig(no_augment=True, cutout=True).validate()


# --------------------------------------------------------------------------- labels and run identity


def test_an_empty_folder_is_looked_at_again_once_a_download_fills_it(tmp_path):
    """A folder's fingerprint is kept for the process, but not an empty folder's None: every process of a run (each
    with its own memory of it) finds the files another process downloaded there."""
    from bench.data.fingerprint import awaits_download, data_fingerprint

    assert awaits_download("cifar10", str(tmp_path)) and data_fingerprint("cifar10", str(tmp_path)) is None
    write_cifar10_pickles(tmp_path)
    assert not awaits_download("cifar10", str(tmp_path))
    found = data_fingerprint("cifar10", str(tmp_path))
    assert found is not None and data_fingerprint("cifar10", str(tmp_path)) == found


def test_a_changed_annotation_file_is_new_labels_for_the_cache_and_the_fingerprint(tmp_path):
    """Tiny-ImageNet's test labels come from val_annotations.txt: correcting it (same length) changes the labels a
    cached load returns and the folder's fingerprint, so no run is attributed to the old labels."""
    from bench.data.fingerprint import folder_fingerprint, forget_fingerprints

    _write_tiny_folder(tmp_path)
    ann, cache = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt", str(tmp_path / "c")
    _, test = load_dataset_splits("tinyimagenet", data_dir=str(tmp_path), download=False, cache_dir=cache)
    before = folder_fingerprint(str(tmp_path))
    text = ann.read_text()
    ann.write_text(text.replace("val_0.JPEG\tn02", "val_0.JPEG\tn01"))
    assert len(ann.read_text()) == len(text)
    _, fixed = load_dataset_splits("tinyimagenet", data_dir=str(tmp_path), download=False, cache_dir=cache)
    assert test.labels.tolist() == [1, 0] and fixed.labels.tolist() == [0, 0]
    forget_fingerprints()
    assert folder_fingerprint(str(tmp_path)) != before


def test_an_empty_tiny_class_folder_or_annotation_file_is_refused(tmp_path, downloads):
    _write_tiny_folder(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    ann = base / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text("")
    assert _load_error("tinyimagenet", str(tmp_path)) == f"Tiny-ImageNet: {ann} lists no images"
    ann.write_text(text)
    for image in (base / "train" / "n02" / "images").iterdir():
        image.unlink()
    msg = _load_error("tinyimagenet", str(tmp_path))
    assert msg == f"Tiny-ImageNet: class folder {base / 'train' / 'n02' / 'images'} holds no images"


def test_a_broken_link_under_the_data_folder_is_one_error_line(tmp_path):
    from bench.data.fingerprint import data_fingerprint

    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"^cannot read .*data_batch_1 \(No such file or directory\)$"):
        data_fingerprint("cifar10", str(tmp_path))


def test_labels_that_are_not_class_indices_are_refused(tmp_path, downloads):
    """Class names in a parquet label column, or a streamed split's: one line naming where, not int()'s error."""
    from datasets import Dataset, Features, IterableDataset, Value
    from datasets import Image as HFImage

    from bench.data.hub import _stream_split

    feats = Features({"img": HFImage(), "label": Value("string")})
    images = [_to_pil(im) for im in _rng_images(5, 2, 3, 32)]
    for split in ("train", "test"):
        Dataset.from_dict({"img": images, "label": ["cat", "dog"]}, features=feats).to_parquet(str(tmp_path / f"{split}.parquet"))
    msg = _load_error("cifar10", str(tmp_path), download=False)
    assert msg.endswith("labels must be integer class indices, got 'cat'")
    from bench.data.datasets import check_labels

    assert check_labels(np.array([1.0, 0.0]), 2, 3, "w").tolist() == [1, 0]  # whole numbers stored as floats
    assert check_labels(np.array([1, 2], dtype=object), 2, 3, "w").tolist() == [1, 2]
    with pytest.raises(DataError, match=r"^w: 1 of 2 labels are missing$"):
        check_labels(np.array([1.0, np.nan]), 2, 3, "w")
    with pytest.raises(DataError, match=r"^w: labels must be integer class indices, got True$"):
        check_labels(np.array([True, False]), 2, 3, "w")

    def examples():
        yield from ({"img": image, "label": name} for image, name in zip(images, ["cat", "dog"]))

    stream = {"train": IterableDataset.from_generator(examples, features=feats)}
    with pytest.raises(DataError, match=r"^hf:me/pets split train: column 'label' holds Value\('string'\)"):
        _stream_split(stream, "train", "me/pets", "img", "label", None)
