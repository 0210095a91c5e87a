"""Hugging Face Hub parquet files: finding them, checking their columns, decoding their images."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.data.cache import cached
from bench.data.datasets import DatasetInfo, check_labels, short_error
from bench.data.names import DataError
from bench.data.sources import Findings

# --------------------------------------------------------------------------- decoding


def decode_images(blobs: Sequence[Any], size: int, channels: int, where: str) -> np.ndarray:
    """Decode encoded images (bytes, or file paths) to uint8 ``[N, C, H, W]``.

    Uses PIL (the decoder ``datasets`` uses for its Image feature), converting
    to RGB / L as needed; every image must be ``size`` x ``size``.
    """
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(blobs), size, size, channels), dtype=np.uint8)
    view = out if channels != 1 else out[..., 0]
    for i, blob in enumerate(blobs):
        try:
            src = io.BytesIO(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else blob
            with Image.open(src) as im:
                if im.mode != mode:
                    im = im.convert(mode)
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            label = blob if isinstance(blob, str) else f"image #{i}"
            raise DataError(f"{where}: cannot decode {label} ({short_error(exc)})") from None
        if arr.shape[:2] != (size, size):
            label = blob if isinstance(blob, str) else f"image #{i}"
            raise DataError(f"{where}: {label} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
        view[i] = arr
    return out.transpose(0, 3, 1, 2)


def image_blobs(table, column: str, base_dir: str | None) -> list[Any]:
    """Encoded bytes (or file paths) of an Image-feature column of an Arrow table."""
    import pyarrow as pa

    col = table.column(column)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_struct(col.type):
        names = [col.type.field(i).name for i in range(col.type.num_fields)]
        data = col.field("bytes").to_pylist() if "bytes" in names else [None] * len(col)
        paths = col.field("path").to_pylist() if "path" in names else [None] * len(col)
    elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        data, paths = col.to_pylist(), [None] * len(col)
    else:
        raise DataError(f"column {column!r} has type {col.type}, expected an Image feature (bytes/path)")
    blobs: list[Any] = []
    for b, p in zip(data, paths):
        if b is not None:
            blobs.append(b)
        elif p is not None:
            blobs.append(p if os.path.isabs(p) or base_dir is None else os.path.join(base_dir, p))
        else:
            raise DataError(f"column {column!r} has an image with neither bytes nor path")
    return blobs


def decode_hf_split(ds, image_col: str, label_col: str, info: DatasetInfo, where: str, base_dir: str | None):
    table = ds.with_format("arrow")[:]
    blobs = image_blobs(table, image_col, base_dir)
    labels = table.column(label_col).to_numpy(zero_copy_only=False)
    images = decode_images(blobs, info.image_size, info.channels, where)
    labels = check_labels(labels, images.shape[0], info.num_classes, where)
    return images, labels


def quiet_datasets():
    """Context manager silencing ``datasets`` progress bars while we load."""
    import datasets

    @contextlib.contextmanager
    def ctx():
        was_disabled = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            yield datasets
        finally:
            if not was_disabled:
                datasets.enable_progress_bars()

    return ctx()


def unreadable_parquet(info: DatasetInfo, paths: Sequence[str], exc: BaseException) -> DataError:
    """The error for parquet files ``datasets`` could not read, naming the first file pyarrow cannot read."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            pq.read_table(path)
        except Exception as file_exc:
            return DataError(f"{info.display_name}: cannot read {path} ({short_error(file_exc)})")
    return DataError(f"{info.display_name}: cannot read parquet files {list(paths)} ({short_error(exc)})")


def load_parquet_splits(
    info: DatasetInfo,
    files: dict[str, list[str]],
    image_col: str,
    label_col: str,
    cache_dir: str,
):
    """Decode ``{"train": [...], "test": [...]}`` parquet files (through the cache)."""
    sources = sorted(files["train"]) + sorted(files["test"])

    def build():
        # load_dataset copies the parquet into an Arrow cache; keep that copy in a
        # temporary folder so that only our decoded safetensors file stays on disk.
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".hf-", dir=cache_dir)
        except OSError:
            tmp = tempfile.mkdtemp(prefix="sam-bench-hf-")
        try:
            with quiet_datasets() as datasets:
                try:
                    dd = datasets.load_dataset("parquet", data_files=files, cache_dir=tmp)
                except Exception as exc:
                    raise unreadable_parquet(info, sources, exc) from None
                out = []
                for split in ("train", "test"):
                    where = f"{info.name} {split} ({files[split][0]})"
                    base = os.path.dirname(files[split][0])
                    out.append(decode_hf_split(dd[split], image_col, label_col, info, where, base))
                del dd
            return out[0], out[1]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return cached(info, cache_dir, sources, build, extra=f"{image_col}/{label_col}")


def parquet_problem(paths: Sequence[str], columns: set[str]) -> tuple[str | None, bool]:
    """``(problem, unreadable)`` for the first of ``paths`` that cannot be read or lacks ``columns``."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            have = set(pq.read_schema(path).names)
        except Exception as exc:
            return f"cannot read {path} ({short_error(exc)})", True
        if not columns <= have:
            return f"{path} has the columns {sorted(have)}, expected {sorted(columns)}", False
    return None, False


def find_parquet(
    dirs: Sequence[str],
    subdirs: Sequence[str],
    globs: tuple[str, str],
    columns: set[str],
    found: Findings,
    specific_subdirs: Sequence[str] = (),
) -> dict[str, list[str]] | None:
    """The first folder ``dir/subdir`` holding train and test parquet files (``globs``) with ``columns``.

    Other matches go into ``found``: an unreadable file, or files with the right
    columns but one split only, are broken copies; files with other columns are
    a broken copy in a folder named for the dataset (``dirs[1:]`` or a
    ``specific_subdirs``) and something else elsewhere.
    """
    for i, d in enumerate(dirs):
        for sub in subdirs:
            folder = os.path.join(d, sub) if sub else d
            train, test = (sorted(glob.glob(os.path.join(folder, g))) for g in globs)
            if not train and not test:
                continue
            problem, unreadable = parquet_problem(train + test, columns)
            if problem is not None:
                ours = unreadable or i > 0 or sub in specific_subdirs
                (found.broken if ours else found.other).append(problem)
            elif not train or not test:
                have, missing = (globs[0], globs[1]) if train else (globs[1], globs[0])
                found.broken.append(f"{folder} has {have} but no {missing} files (an interrupted download?)")
            else:
                return {"train": train, "test": test}
    return None
