"""Batch-wise data augmentation on uint8 image tensors.

Everything here works on a whole batch ``[B, C, H, W]`` at once with tensor
operations, on whatever device the batch lives on (no PIL, no Python loop
over the samples). All randomness comes from the ``torch.Generator`` passed
in, which must live on the same device as the images, so that a run is
reproducible and can be resumed by restoring the generator state.

Random numbers are drawn in a fixed order, and only for the enabled parts:

1. crop offsets (rows, then columns), each ``B`` integers in ``[0, 2p]``;
2. flip decisions, ``B`` uniform floats (flip where ``< 0.5``);
3. cutout centres (rows, then columns), ``B`` integers in ``[0, H)`` / ``[0, W)``.

Imports run one way: this module uses ``bench.data`` (for the per-dataset
defaults of :func:`default_augmentation`); ``bench.data`` never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.data.datasets import DatasetInfo, get_dataset_info

__all__ = ["Augmentation", "default_augmentation", "augment", "normalize"]


@dataclass(frozen=True)
class Augmentation:
    """What :func:`augment` does to a batch.

    crop_padding: pad every side with ``crop_padding`` zero pixels, then take a
        random crop of the original size (0 disables).
    flip: random horizontal flip with probability 1/2.
    cutout: side of a square blanked out, its centre drawn uniformly over the
        image and the square clipped at the borders (DeVries & Taylor, 2017);
        0 disables.
    cutout_fill: per-channel uint8 value of the blanked square; the dataset's mean
        pixel makes it zero after normalisation, as in the original (which masks
        normalised images). Empty: 0.
    """

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    cutout_fill: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative int, got {self.crop_padding!r}")
        if int(self.cutout) != self.cutout or self.cutout < 0:
            raise ValueError(f"cutout must be a non-negative int, got {self.cutout!r}")

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.flip and self.cutout == 0


def default_augmentation(dataset: str | DatasetInfo, cutout: bool = False) -> Augmentation:
    """The standard augmentation for a dataset (a name or a ``bench.data.DatasetInfo``).

    cifar10/cifar100: pad 4 + flip (+ cutout 16); tinyimagenet: pad 8 + flip
    (+ cutout 32); digits: pad 1, no flip (digits are not mirror-symmetric)
    (+ cutout 4). The cutout square is filled with the dataset's mean pixel.
    """
    info = dataset if isinstance(dataset, DatasetInfo) else get_dataset_info(dataset)
    return Augmentation(
        crop_padding=info.crop_padding,
        flip=info.flip,
        cutout=info.cutout_size if cutout else 0,
        cutout_fill=tuple(round(255 * m) for m in info.mean),
    )


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    gdev = generator.device
    if gdev.type != device.type or (
        device.type != "cpu" and gdev.index is not None and device.index is not None and gdev.index != device.index
    ):
        raise ValueError(
            f"augment: the generator is on {gdev} but the images are on {device}; "
            f"create it with torch.Generator(device=images.device)"
        )


def augment(images_uint8: Tensor, aug: Augmentation, generator: torch.Generator) -> Tensor:
    """Randomly crop / flip / cut out a uint8 batch ``[B, C, H, W]``.

    Returns a new uint8 tensor of the same shape on the same device; the input
    is never modified. Random numbers are drawn in the order of the module
    docstring: crop offsets, flips, cutout centres.
    """
    x = images_uint8
    _check_batch(x)
    if aug.is_identity:
        return x.clone()
    _check_generator(generator, x.device)
    rows, cols = _crop_flip_coordinates(x.shape, aug, generator, x.device)
    out = _gather(x, rows, cols, int(aug.crop_padding)) if cols is not None else x.clone()
    if int(aug.cutout) > 0:
        out = _cutout(out, aug, generator)
    return out


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"augment expects a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"augment expects uint8 images, got {x.dtype}")


def _crop_flip_coordinates(
    shape: torch.Size, aug: Augmentation, generator: torch.Generator, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """Rows ``[B, H]`` and columns ``[B, W]`` to read from the zero-padded image.

    Draws the crop offsets (rows, then columns) and then the flips. ``rows`` is
    None without a crop; ``cols`` is None without crop and flip (nothing moves).
    """
    B, _, H, W = shape
    p = int(aug.crop_padding)
    rows = cols = None
    if p > 0:
        oy = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=device)
        ox = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=device)
        rows = oy[:, None] + torch.arange(H, device=device)  # [B, H] rows of the padded image
        cols = ox[:, None] + torch.arange(W, device=device)  # [B, W] columns of the padded image
    if aug.flip:
        flip = torch.rand(B, generator=generator, device=device) < 0.5
        if cols is None:
            cols = torch.arange(W, device=device).expand(B, W)
        # flipping the crop = reading its columns backwards
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    return rows, cols


def _gather(x: Tensor, rows: Tensor | None, cols: Tensor, p: int) -> Tensor:
    """One gather for crop and flip together, over the flattened image padded by ``p``."""
    B, C, H, W = x.shape
    device = x.device
    src = F.pad(x, (p, p, p, p)) if p > 0 else x
    Hs, Ws = H + 2 * p, W + 2 * p
    if rows is None:
        rows = torch.arange(H, device=device).expand(B, H)
    index = (rows[:, :, None] * Ws + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    return src.reshape(B, C, Hs * Ws).gather(2, index).view(B, C, H, W)


def _cutout(out: Tensor, aug: Augmentation, generator: torch.Generator) -> Tensor:
    """Blank an ``aug.cutout`` square per image; draws the centres (rows, then columns).

    ``out`` is a fresh tensor owned by :func:`augment`: it may be modified in place.
    """
    B, C, H, W = out.shape
    device = out.device
    s = int(aug.cutout)
    cy = torch.randint(0, H, (B,), generator=generator, device=device)
    cx = torch.randint(0, W, (B,), generator=generator, device=device)
    y0 = (cy - s // 2)[:, None]
    x0 = (cx - s // 2)[:, None]
    ys = torch.arange(H, device=device)[None, :]
    xs = torch.arange(W, device=device)[None, :]
    in_rows = (ys >= y0) & (ys < y0 + s)  # [B, H]
    in_cols = (xs >= x0) & (xs < x0 + s)  # [B, W]
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # [B, 1, H, W]
    if aug.cutout_fill:
        fill = torch.tensor(aug.cutout_fill, dtype=out.dtype, device=device).view(1, C, 1, 1)
        return torch.where(mask, fill, out)
    return out.masked_fill_(mask, 0)


def normalize(
    images_uint8: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(x / 255 - mean) / std`` per channel, for ``[B, C, H, W]`` or ``[C, H, W]``.

    The arithmetic is done in float32 (float64 if ``dtype`` is float64) and
    the result is cast to ``dtype``.
    """
    x = images_uint8
    if x.dim() not in (3, 4):
        raise ValueError(f"normalize expects [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    C = x.shape[-3]
    if len(mean) != C or len(std) != C:
        raise ValueError(f"normalize: {C} channels but mean has {len(mean)} and std {len(std)} values")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(device=x.device, dtype=work).view(C, 1, 1)
    shift = (mean_t / std_t).to(device=x.device, dtype=work).view(C, 1, 1)
    out = x.to(work).mul_(scale).sub_(shift)
    return out if out.dtype == dtype else out.to(dtype)
