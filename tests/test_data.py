"""Tests for bench.data (dataset loading) and bench.augment (batch augmentation).

Every fixture is written into tmp_path in the genuine on-disk formats; nothing
here needs the network or any shared data.
"""

from __future__ import annotations

import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import bench.data as bd
from bench.augment import Augmentation, augment, default_augmentation, normalize
from bench.data import DATASET_INFO, DataError, ImageDataset, available_datasets, load_dataset_splits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- fixture writers


def _rng_images(seed: int, n: int, c: int, size: int, low: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, 256, size=(n, c, size, size), dtype=np.uint8)


def _write_cifar10_pickles(root, n_per_batch=20, n_test=10):
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
            folder / "cifar100" / f"{name}-00000-of-00001.parquet", xx, yy, "img", "fine_label", 100,
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
        assert bd.canonical_name(alias) == name


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
    (x, y), (xt, yt) = _write_cifar10_pickles(root)
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
    (x, _), _ = _write_cifar10_pickles(tmp_path)
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

    monkeypatch.setattr(bd, "_decode_images", boom)
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
    assert bd.default_cache_dir() == str(tmp_path / "envcache")
    _write_cifar10_parquet(tmp_path / "d")
    load_dataset_splits("cifar10", data_dir=str(tmp_path / "d"), download=False)
    assert list((tmp_path / "envcache").glob("cifar10-*.safetensors"))


def test_unwritable_cache_dir_still_loads(tmp_path):
    (x, _), _ = _write_cifar10_parquet(tmp_path / "d")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cache"):
        train, _ = load_dataset_splits(
            "cifar10", data_dir=str(tmp_path / "d"), download=False, cache_dir=str(blocker / "sub")
        )
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
    assert "download is off" in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__ in (False, True)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    calls = []

    def no_network(name, root):
        calls.append((name, root))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(bd, "_torchvision_download", no_network)
    with pytest.raises(DataError) as ei:
        load_dataset_splits("cifar100", data_dir=str(tmp_path), download=True, cache_dir=str(tmp_path / "c"))
    msg = str(ei.value)
    assert calls == [("cifar100", str(tmp_path))]
    assert "\n" not in msg and "failed" in msg and "name resolution" in msg
    assert str(tmp_path) in msg and "uoft-cs/cifar100" in msg


def test_download_then_read_pickles(tmp_path, monkeypatch):
    expected = {}

    def fake_download(name, root):
        from pathlib import Path

        expected["data"] = _write_cifar10_pickles(Path(root))

    monkeypatch.setattr(bd, "_torchvision_download", fake_download)
    train, test = load_dataset_splits("cifar10", data_dir=str(tmp_path), download=True, cache_dir=str(tmp_path / "c"))
    (x, y), (xt, _) = expected["data"]
    assert torch.equal(train.images, torch.from_numpy(x)) and torch.equal(test.images, torch.from_numpy(xt))


def test_missing_tinyimagenet(tmp_path, monkeypatch):
    def offline(repo_id):
        raise ConnectionError(f"cannot reach the hub for {repo_id}")

    monkeypatch.setattr(bd, "_hf_download", offline)
    with pytest.raises(DataError) as ei:
        load_dataset_splits("tiny-imagenet", data_dir=str(tmp_path), download=True, cache_dir=str(tmp_path / "c"))
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path) in msg and "zh-plus/tiny-imagenet" in msg and "cannot reach" in msg
    with pytest.raises(DataError, match="download is off"):
        load_dataset_splits("tinyimagenet", data_dir=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))


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

    monkeypatch.setattr(bd, "_decode_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
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
    assert shape(DATASET_INFO["cifar10"].augmentation) == shape(default_augmentation("cifar10"))


def test_cutout_is_zero_after_normalisation():
    """The blanked square holds the mean pixel, i.e. zero in normalised space, as in DeVries & Taylor."""
    aug = default_augmentation("cifar10", cutout=True)
    x = _nonzero_batch()
    out = normalize(augment(x, Augmentation(0, False, 16, aug.cutout_fill), _gen("cpu", 0)), DATASET_INFO["cifar10"].mean,
                    DATASET_INFO["cifar10"].std)
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
