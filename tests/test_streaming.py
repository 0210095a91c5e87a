"""Datasets read by DataLoader workers: image class folders and streamed hub datasets.

The fixtures are written by the tests: 3 classes of small random RGB images (JPEG and PNG, sizes
around 40x36) as class folders, and the same images as parquet files with ``datasets``' Image and
ClassLabel features, read back through ``datasets``' own streaming loader. Runs use a 32x32 view.
"""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import bench.data.hub
import bench.data.loader
import bench.data.views
import bench.loop.epoch
from bench.cli.main import main
from bench.config import ConfigError, RunConfig
from bench.data.batches import epoch_order
from bench.data.folders import load_image_folders
from bench.data.hub import open_hub_dataset
from bench.data.loader import LoaderBatches
from bench.data.names import DataError
from bench.data.prepare import prepare_train_set
from bench.data.views import View
from bench.io import read_jsonl
from bench.loop.splits import LoaderSplit
from bench.loop.train import train
from bench.resolve import resolve

CLASSES = ("cat", "dog", "fox")
TIMING = ("epoch_time_s", "images_per_s", "step_time_mean_s")
FAST = dict(arch="smallcnn", epochs=2, batch_size=8, lr=0.05, image_size=32, cpu=True, threads=1, schedule="constant")


def _images(count: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(count):
        width, height = int(rng.integers(30, 48)), int(rng.integers(28, 44))
        yield k, Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/: 3 classes x 8 images; val/: 3 x 4; every other image a PNG, the rest JPEG."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, count in (("train", 8), ("val", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for k, image in _images(count, seed=10 * c + len(split)):
                image.save(root / split / name / f"{k:02d}.{'png' if k % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, folder) -> dict[str, list[str]]:
    """The folder's images as hub-layout parquet files (Image + ClassLabel features)."""
    from datasets import ClassLabel, Dataset, Features, Image

    root = tmp_path_factory.mktemp("hub")
    files = {}
    for split, theirs in (("train", "train"), ("val", "validation")):
        paths = sorted((folder / split).rglob("*.*"))
        data = {
            "image": [{"bytes": p.read_bytes(), "path": None} for p in paths],
            "label": [CLASSES.index(p.parent.name) for p in paths],
        }
        features = Features(image=Image(), label=ClassLabel(names=list(CLASSES)))
        path = root / f"{theirs}-00000-of-00001.parquet"
        Dataset.from_dict(data, features=features).to_parquet(str(path))
        files[theirs] = [str(path)]
    return files


def _load_dataset_redirected(monkeypatch, load):
    """``datasets.load_dataset("someone/tiny", streaming=True)`` returns ``load()``."""
    import datasets

    def load_dataset(path, *args, streaming=False, **kwargs):
        assert path == "someone/tiny" and streaming and not args and not kwargs
        return load()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(bench.data.hub, "hub_unreachable", lambda: None)  # the stand-in needs no network
    return "hf:someone/tiny"


@pytest.fixture
def hub_parquet(monkeypatch, parquet):
    """The hub dataset as its parquet files, read by ``datasets``' streaming parquet loader."""
    import datasets

    load = datasets.load_dataset
    return _load_dataset_redirected(monkeypatch, lambda: load("parquet", data_files=parquet, streaming=True))


@pytest.fixture
def hub(monkeypatch, folder):
    """The hub dataset as ``IterableDataset``s generating the folder's images as PIL images.

    (A shuffled stream of parquet files pauses 5 s at its end, a pyarrow work-around in
    ``datasets``: once per epoch in a real run, too often for a test.)"""
    from datasets import ClassLabel, Features, Image, IterableDataset, IterableDatasetDict
    from PIL import Image as PILImage

    features = Features(image=Image(), label=ClassLabel(names=list(CLASSES)))

    def examples(split):
        for path in sorted((folder / split).rglob("*.*")):
            with PILImage.open(path) as image:
                yield {"image": image.copy(), "label": CLASSES.index(path.parent.name)}

    def load():
        return IterableDatasetDict(
            {
                theirs: IterableDataset.from_generator(examples, features=features, gen_kwargs={"split": ours})
                for ours, theirs in (("train", "train"), ("val", "validation"))
            }
        )

    return _load_dataset_redirected(monkeypatch, load)


class Killed(Exception):
    pass


def run(tmp_path: Path, name: str, stop_after: int | None = None, resume: bool = False, **settings) -> Path:
    """Train; with ``stop_after``, die (no clean-up) as step ``stop_after + 1`` starts."""
    config = RunConfig(**{**FAST, **settings}, output_dir=str(tmp_path), run_name=name)
    if stop_after is None:
        return train(config, resume=resume).run_dir
    one_step, calls = bench.loop.epoch.one_step, []

    def dying(*args, **kwargs):
        if len(calls) == stop_after:
            raise Killed
        calls.append(1)
        return one_step(*args, **kwargs)

    bench.loop.epoch.one_step = dying
    try:
        with pytest.raises(Killed):
            train(config, resume=resume)
    finally:
        bench.loop.epoch.one_step = one_step
    return config.run_dir()


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_jsonl(a / "metrics.jsonl")) == strip(read_jsonl(b / "metrics.jsonl"))


# -- layout and errors -------------------------------------------------------------------------------


def test_folder_layout(folder):
    train_set, val = load_image_folders(str(folder))
    assert train_set.classes == val.classes == CLASSES and (len(train_set), len(val)) == (24, 12)
    assert train_set.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert train_set.files[:3].tolist() == ["cat/00.jpg", "cat/01.png", "cat/02.jpg"]
    # a training subset, a validation split and label noise select files and labels
    prepared = prepare_train_set(train_set, subset=18, label_noise=0.2, seed=0, val_fraction=1 / 3)
    assert (len(prepared.train), len(prepared.val)) == (12, 6) and len(prepared.noisy_indices) == 2
    assert set(prepared.val.files) <= set(train_set.files) and not set(prepared.val.files) & set(prepared.train.files)


def test_folder_errors_are_one_line(folder, tmp_path):
    def message(root) -> str:
        with pytest.raises(DataError) as info:
            load_image_folders(str(root))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "does not exist" in message(tmp_path / "nope")
    assert "has no train/ folder" in message(tmp_path)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    assert "class folder" in message(tmp_path) and "holds no images" in message(tmp_path)
    (tmp_path / "train" / "cat" / "a.JPEG").write_bytes((folder / "train/cat/00.jpg").read_bytes())
    assert "has no val/ folder" in message(tmp_path)
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    assert "val/zebra is not a class of" in message(tmp_path) and "(its 1 classes: cat)" in message(tmp_path)
    # an unreadable image, decoded by a worker process, is one line naming it in the training process
    (tmp_path / "val" / "zebra").rmdir()
    (tmp_path / "val" / "cat").mkdir()
    (tmp_path / "val" / "cat" / "b.png").write_bytes(b"not a png")
    _, val = load_image_folders(str(tmp_path))
    with pytest.raises(DataError, match=r"cannot decode .*val/cat/b\.png \(UnidentifiedImageError") as info:
        bench.data.loader.fixed_samples(val, 1, torch.device("cpu"), workers=2)
    assert "\n" not in str(info.value)


def test_bad_settings_are_one_line(tmp_path, capsys, folder):
    def refused(match: str, **settings):
        with pytest.raises(ConfigError, match=match) as info:
            resolve(RunConfig(**settings, output_dir=str(tmp_path)))
        assert "\n" not in str(info.value)

    refused(r"image_size must be an integer >= 8, got 4", dataset="imagefolder", data_dir=str(folder), image_size=4)
    refused(r"workers must be an integer >= 0, got -1", dataset="imagefolder", data_dir=str(folder), workers=-1)
    refused("imagefolder needs --data_dir DIR", dataset="imagefolder")
    refused("image_size: only for the imagefolder and hf: datasets, not cifar10", dataset="cifar10", image_size=32)
    refused("label_noise 0.1: needs random access", dataset="hf:someone/tiny", label_noise=0.1)
    refused("saf keeps a value per training sample", dataset="hf:someone/tiny", optimizer="saf")
    refused("expected hf:OWNER/NAME", dataset="hf:nothing")
    refused("unknown dataset 'mnist'; choose one of: .*imagefolder, hf:OWNER/NAME", dataset="mnist")
    out = tmp_path / "out"
    assert main(["--dataset", "imagefolder", "--data_dir", str(tmp_path / "none"), "--output_dir", str(out), "--cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: imagefolder: data_dir") and "\n" not in err and not out.exists()


def test_hub_columns_are_detected_or_named(hub_parquet):
    train_set, val = open_hub_dataset("someone/tiny")
    assert (train_set.image_column, train_set.label_column, train_set.num_classes) == ("image", "label", 3)
    assert (len(train_set), len(val), val.name) == (24, 12, "hf:someone/tiny validation")
    with pytest.raises(DataError, match=r"hf:someone/tiny has no column 'jpg' \(its columns: image, label\)"):
        open_hub_dataset("someone/tiny", image_column="jpg")


# -- views and batches ---------------------------------------------------------------------------------


def test_views_are_seeded_by_seed_epoch_and_sample():
    ((_, image),) = _images(1, seed=3)
    a = View(32, train=True, seed=1, epoch=2)
    assert a(image, 5).shape == (3, 32, 32) and a(image, 5).dtype == torch.uint8
    assert torch.equal(a(image, 5), View(32, train=True, seed=1, epoch=2)(image, 5))
    assert not torch.equal(a(image, 5), a(image, 6)) and not torch.equal(a(image, 5), View(32, True, 1, 3)(image, 5))
    evaluation = View(32, train=False)
    assert torch.equal(evaluation(image, 0), evaluation(image, 7)) and evaluation(image, 0).shape == (3, 32, 32)


def test_loader_batches_follow_the_epoch_order_and_leave_the_global_rng_alone(folder):
    config = resolve(RunConfig(**FAST, dataset="imagefolder", data_dir=str(folder)))
    train_set, _ = bench.data.loader.load_loader_splits(config)
    batches = LoaderBatches(config, train_set, 3, torch.device("cpu"), workers=0)
    state = torch.get_rng_state()
    x, y, ids = batches.batch(1, 1)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(ids, epoch_order(config, 24, 1)[8:16]) and torch.equal(y, train_set.labels[ids])
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    # two processes: each decodes its half; the other half of its batch is a placeholder
    halves = [LoaderBatches(config, train_set, 3, torch.device("cpu"), rank, 2, workers=0).batch(1, 1) for rank in (0, 1)]
    for rank, (xr, yr, idr) in enumerate(halves):
        mine = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(xr[mine], x[mine]) and torch.equal(yr[mine], y[mine]) and torch.equal(idr[mine], ids[mine])
        assert (idr[slice(4 - 4 * rank, 8 - 4 * rank)] == -1).all()


# -- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_workers_do_not_change_a_run_and_a_killed_run_resumes_bit_identically(optimizer, folder, tmp_path, monkeypatch):
    data = dict(dataset="imagefolder", data_dir=str(folder), optimizer=optimizer, save_every_steps=1)
    whole = run(tmp_path, "w0", workers=0, **data)
    assert_same_run(whole, run(tmp_path, "w2", workers=2, **data))
    if optimizer == "sgd":
        return
    # 3 steps per epoch: killed as step 5 starts (epoch 2, step 2), resumed from the step-4 checkpoint
    killed = run(tmp_path, "killed", stop_after=4, workers=0, **data)
    decode, decoded = bench.data.views._decode, []
    monkeypatch.setattr(bench.data.views, "_decode", lambda image, where: decoded.append(image) or decode(image, where))
    run(tmp_path, "killed", resume=True, workers=0, **data)
    assert_same_run(whole, killed)
    # the resumed run decodes the last 2 steps of epoch 2 (16 images) and the 12 val images, nothing skipped
    order = epoch_order(RunConfig(**FAST), 24, 1)[8:].tolist()
    train_files, _ = load_image_folders(str(folder))
    assert decoded[:16] == [str(folder / "train" / train_files.files[k]) for k in order] and len(decoded) == 28


def test_a_streamed_hub_dataset_trains_and_resumes_bit_identically(hub, tmp_path):
    data = dict(dataset=hub, optimizer="sam", save_every_steps=1)
    whole = run(tmp_path, "whole", workers=0, **data)
    rows = read_jsonl(whole / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6] and all(0 <= r["test_acc"] <= 1 for r in rows)
    killed = run(tmp_path, "killed", stop_after=4, workers=2, **data)
    run(tmp_path, "killed", resume=True, workers=2, **data)
    assert_same_run(whole, killed)


def test_the_loader_evaluation_equals_the_in_memory_one(folder):
    from accelerate import Accelerator
    from PIL import Image

    from architectures import create_model
    from bench.data.datasets import ImageDataset
    from bench.loop.evaluation import evaluate

    _, val = load_image_folders(str(folder))
    val = dataclasses.replace(val, image_size=32)
    view = View(32, train=False)
    images = torch.stack([view(Image.open(io.BytesIO((Path(val.root) / f).read_bytes())).convert("RGB"), 0) for f in val.files])
    in_memory = ImageDataset(images, val.labels, 3, val.mean, val.std, "val")
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=3)
    accelerator = Accelerator(cpu=True)
    expected = evaluate(model, in_memory, images, val.labels, accelerator, prefix="test")
    measured = LoaderSplit("test", val, batch_size=5, workers=0).evaluate(model, accelerator)
    assert measured.keys() == expected.keys() and measured == pytest.approx(expected, rel=1e-5)


def test_an_unreachable_hub_is_one_line_before_any_retry(monkeypatch):
    """Without a network the client retries for many seconds; the harness tries one connection (3 s at most)
    and names the way out, without calling the client at all."""
    import socket

    import datasets

    from bench.data.hub import open_hub_dataset

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the client was called"))
    with pytest.raises(DataError, match=r"^hf:someone/tiny: the Hugging Face Hub cannot be reached \(huggingface.co:443: "):
        open_hub_dataset("someone/tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the local cache: no connection tried
    assert bench.data.hub.hub_unreachable() is None
