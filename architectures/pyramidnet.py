"""PyramidNet (Han et al., 2017) with additive widening.

The channel count grows by ``alpha / N`` after each of the N blocks (rounded
to an integer per block), over three stages with strides 1, 2, 2.  Blocks
follow the paper's final design: BN first, no ReLU after the first BN nor
before the addition, and a BN at the end.  Shortcuts are identities,
zero-padded with the extra channels and, when downsampling, preceded by a 2x2
average pool.

Block type: ``bottleneck=None`` picks bottleneck blocks for depth >= 164 and
basic blocks otherwise, as in the paper.  Basic blocks need
(depth - 2) % 6 == 0 (e.g. 110), bottleneck blocks (depth - 2) % 9 == 0
(e.g. 164, 200, 272).

With 100 classes ``pyramidnet110_270`` has 28.51M parameters and
``pyramidnet272_200`` 26.29M, as in the authors' PyTorch code; the paper
reports 28.3M and 26.0M.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import init_weights
from .registry import register, register_pattern


class _PyramidBlock(nn.Module):
    """Residual branch plus a (pooled,) zero-padded identity shortcut."""

    expansion = 1

    def __init__(self, residual: nn.Module, stride: int):
        super().__init__()
        self.residual = residual
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x):
        out = self.residual(x)
        shortcut = self.pool(x)
        return out + F.pad(shortcut, (0, 0, 0, 0, 0, out.size(1) - shortcut.size(1)))


class PyramidBasicBlock(_PyramidBlock):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__(
            nn.Sequential(
                nn.BatchNorm2d(in_planes),
                nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, planes, 3, 1, 1, bias=False),
                nn.BatchNorm2d(planes),
            ),
            stride,
        )


class PyramidBottleneck(_PyramidBlock):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__(
            nn.Sequential(
                nn.BatchNorm2d(in_planes),
                nn.Conv2d(in_planes, planes, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, planes * self.expansion, 1, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            ),
            stride,
        )


@register_pattern("pyramidnet{depth}_{alpha}")
@register("pyramidnet272_200", depth=272, alpha=200)
@register("pyramidnet110_270", depth=110, alpha=270)
@register("pyramidnet")
class PyramidNet(nn.Module):
    def __init__(
        self, depth: int = 110, alpha: float = 270, bottleneck: bool | None = None, num_classes: int = 10, in_channels: int = 3
    ):
        super().__init__()
        if bottleneck is None:
            bottleneck = depth >= 164
        block, per_block = (PyramidBottleneck, 9) if bottleneck else (PyramidBasicBlock, 6)
        if depth < per_block + 2 or (depth - 2) % per_block:
            kind, examples = ("bottleneck", "164, 200, 272") if bottleneck else ("basic", "110, 164, 200")
            raise ValueError(
                f"PyramidNet with {kind} blocks needs depth = {per_block}n+2 with n >= 1 (e.g. {examples}), got {depth}"
            )
        if alpha < 0:
            raise ValueError(f"PyramidNet alpha must be >= 0, got {alpha}")
        n = (depth - 2) // per_block
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes, width = [], 16, 16.0
        for stride in [1, 2, 2]:
            for s in [stride] + [1] * (n - 1):
                width += alpha / (3 * n)
                layers.append(block(in_planes, round(width), s))
                in_planes = round(width) * block.expansion
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
