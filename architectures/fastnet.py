"""An 8-layer CIFAR network for minute-scale GPU studies, built from the published facts of the
CIFAR-10 speed runs (``airbench94``; see the project's reference notes on fast CIFAR-10 training).

- A frozen 2x2 patch-whitening convolution (no padding, ``2 * C * 2 * 2`` filters): the eigenvectors
  of the training images' patch covariance scaled by ``1 / sqrt(eigenvalue + eps)``, with their
  negatives, set by :meth:`FastNet.init_from_data` before training; its bias trains, from 0. GELU.
- Three groups of widths 64, 256, 256: conv 3x3 (no bias, each the identity on its first input channels),
  max-pool 2, BatchNorm, GELU, conv 3x3, BatchNorm, GELU. BatchNorm keeps no scale (a bias only), with
  eps 1e-12 and running-statistics momentum 0.4.
- Max-pool 3 (on 32x32 inputs; a global max-pool on larger ones), a linear layer without bias, the logits
  scaled by 1/9. Inputs of at least 32x32.

Left out of the published recipe: the whitening bias frozen after 3 epochs, BatchNorm biases at 64x the
learning rate, the weights' lookahead average; the harness's own schedule, flips (``--test_flips``) and
label smoothing stand for the rest.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register

WHITEN_EPS = 5e-4


def _batchnorm(width: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(width, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)  # a bias only: the scale stays 1
    return bn


def _conv(in_width: int, width: int) -> nn.Conv2d:
    """A 3x3 convolution without bias, the identity on its first input channels, the rest as initialised
    (airbench94 initialises every convolution of its groups so)."""
    conv = nn.Conv2d(in_width, width, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(in_width, width)])
    return conv


class _Group(nn.Sequential):
    def __init__(self, in_width: int, width: int):
        super().__init__(
            _conv(in_width, width),
            nn.MaxPool2d(2),
            _batchnorm(width),
            nn.GELU(),
            _conv(width, width),
            _batchnorm(width),
            nn.GELU(),
        )


@register("fastnet")
class FastNet(nn.Module):
    """Whitening conv - 3 x (conv, pool, BN, GELU, conv, BN, GELU) - global max-pool - linear / 9, for 32x32 images
    (or larger)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (64, 256, 256)):
        super().__init__()
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * 4, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data, never trained
        nn.init.zeros_(self.whiten.bias)  # trained from 0
        groups, width = [], self.whiten.out_channels
        for w in widths:
            groups.append(_Group(width, w))
            width = w
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(width, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1)) / 9  # 32x32 inputs: max-pool 3 of 3x3

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalised training images ``(N, C, H, W)`` (un-augmented)."""
        c, k = self.whiten.in_channels, self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + WHITEN_EPS)[:, None]).reshape(-1, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))
