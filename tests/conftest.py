import pickle
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A small CIFAR-10 in torchvision's on-disk format (pickled batches), 160 train / 40 test images."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 32) for i in range(1, 6)), ("test_batch", 40)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root
