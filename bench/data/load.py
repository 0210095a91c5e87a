"""Image classification datasets as whole uint8 tensors in memory.

``load_dataset_splits(name, data_dir)`` returns ``(train, test)`` as
:class:`ImageDataset` objects holding every image as one uint8 ``[N, C, H, W]``
tensor, ready for batch-wise augmentation (``bench.data.augment``) on any device.
``prepare_train_set`` then applies a run's training-set options (fixed subset,
held-out validation split, label noise) in one fixed order.

Supported datasets (names are case-insensitive, ``-``/``_`` ignored):

* ``digits``: scikit-learn's 8x8 digits, embedded, no download.
* ``cifar10`` / ``cifar100``: torchvision's pickled batches or the Hugging
  Face Hub parquet files (``uoft-cs/cifar10`` / ``uoft-cs/cifar100``).
* ``tinyimagenet``: the original ``tiny-imagenet-200`` folder or the Hub
  parquet files of ``zh-plus/tiny-imagenet``.

Finding and downloading (every dataset but ``digits``). The data is looked for
in ``data_dir`` (default ``./data``) and in ``data_dir/<name>``, plus the
sub-folders each format names. Then:

1. A readable copy is loaded. A copy that is there but broken (a
   ``cifar-10-batches-py/`` missing a batch, a truncated pickle or parquet
   file, parquet files with only the train split, an archive never
   extracted) raises :class:`DataError` naming the file and what is wrong; it
   is never downloaded over.
2. Otherwise a download starts only if ``download`` is on and either no
   ``data_dir`` was given (the default ``./data``, created by the download as
   torchvision does) or the given ``data_dir`` is an existing, empty folder
   (hidden entries such as ``.DS_Store`` aside). Anything else raises
   :class:`DataError` saying what was found: ``data_dir X does not exist``,
   ``X is empty`` (download off) or ``X holds 3 files (a.txt, ...) but no
   cifar-10-batches-py/ or train*.parquet ...``. Nothing is created in
   ``data_dir`` unless a download starts. CIFAR downloads (torchvision) go
   into ``data_dir``; Tiny-ImageNet downloads go to the Hugging Face cache.

Parquet files with other columns than the dataset's are reported (file,
columns found, columns expected); under a folder named for the dataset they
count as a broken copy, elsewhere (``data_dir`` itself, ``data_dir/data``,
which may hold another dataset) as something else that is there.

Images that must be decoded (parquet, JPEG folders) are decoded once and the
result is cached as a safetensors file under ``cache_dir`` (default
``$SAM_BENCH_CACHE`` or ``~/.cache/sam-bench``), keyed by the paths, sizes and
modification times of the source files.
"""

from __future__ import annotations

import os

import numpy as np

from bench.data.cache import default_cache_dir
from bench.data.cifar import load_cifar
from bench.data.datasets import DATASET_INFO, DatasetInfo, ImageDataset, canonical_name, make_dataset
from bench.data.sources import Root
from bench.data.tinyimagenet import load_tinyimagenet


def load_dataset_splits(
    name: str,
    data_dir: str | None = None,
    download: bool = True,
    cache_dir: str | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Load ``(train, test)`` for ``name``; raises :class:`DataError` with a
    one-line explanation when the data cannot be found or read.

    ``data_dir`` is searched directly and in ``data_dir/<name>`` (default
    ``./data``, torchvision's default root; ignored for ``digits``). With
    ``download``, the data is fetched when nothing of it is found and either no
    ``data_dir`` was given or it is an existing empty folder (see the module
    docstring); a broken copy is reported, never downloaded over.
    """
    key = canonical_name(name)
    info = DATASET_INFO[key]
    if key == "digits":
        return _load_digits(info)
    where = Root(os.path.abspath(os.path.expanduser(data_dir if data_dir else "./data")), given=bool(data_dir))
    cache = os.path.abspath(os.path.expanduser(cache_dir if cache_dir else default_cache_dir()))
    if key in ("cifar10", "cifar100"):
        train, test = load_cifar(info, where, download, cache)
    else:
        train, test = load_tinyimagenet(info, where, download, cache)
    return make_dataset(info, *train), make_dataset(info, *test)


# --------------------------------------------------------------------------- digits


def _load_digits(info: DatasetInfo) -> tuple[ImageDataset, ImageDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 -> 0..255 (round half to even; only 8 -> 127.5 -> 128 is a tie)
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    return make_dataset(info, x_tr, y_tr), make_dataset(info, x_te, y_te)
