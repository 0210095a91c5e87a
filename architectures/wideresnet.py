"""Wide ResNets (Zagoruyko & Komodakis, 2016), WRN-depth-k.

Three stages of (depth - 4) / 6 pre-activation blocks (BN-ReLU-conv3x3,
BN-ReLU-dropout-conv3x3) with 16k/32k/64k channels and strides 1, 2, 2.  The
shortcut is a 1x1 conv on the pre-activated input where the shape changes.

``wrn{depth}_{k}_sam`` is the model of the SAM paper's code (google-research/sam,
``sam_jax/models/wide_resnet.py``, after the AutoAugment WRN): where the shape changes the
shortcut has no parameters (average-pooled by the stride, the new channels zeros), taken
from the block's raw input except in the network's first block (its pre-activated input),
and the classifier's weights are drawn from U[-1/sqrt(classes), 1/sqrt(classes)].
WRN-28-10: 36.22M parameters for 10 classes, against 36.48M with 1x1 conv shortcuts.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import init_weights
from .registry import register, register_pattern


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float, pad: bool = False, first: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if changes_shape and not pad else None
        self.pads = changes_shape and pad  # parameter-free: average-pooled by the stride, the new channels zeros
        self.stride, self.extra, self.pads_activated = stride, planes - in_planes, first

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(out)
        elif self.pads:
            shortcut = out if self.pads_activated else x
            shortcut = F.pad(F.avg_pool2d(shortcut, self.stride) if self.stride > 1 else shortcut, (0, 0, 0, 0, 0, self.extra))
        else:
            shortcut = x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


@register_pattern("wrn{depth}_{widen_factor}_sam", shortcut="pad")
@register_pattern("wrn{depth}_{widen_factor}")
@register("wrn34_10", depth=34, widen_factor=10)
@register("wrn28_10", depth=28, widen_factor=10)
@register("wrn16_8", depth=16, widen_factor=8)
@register("wideresnet34", depth=34)
@register("wideresnet28", depth=28)
class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "conv",
    ):
        super().__init__()
        if shortcut not in ("conv", "pad"):
            raise ValueError(f"WideResNet shortcut must be 'conv' or 'pad', got {shortcut!r}")
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be a positive integer, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for planes, stride in zip([16 * widen_factor, 32 * widen_factor, 64 * widen_factor], [1, 2, 2]):
            for s in [stride] + [1] * (n - 1):
                layers.append(WideBlock(in_planes, planes, s, dropout, pad=shortcut == "pad", first=not layers))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)
        if shortcut == "pad":  # the SAM code's classifier
            nn.init.uniform_(self.fc.weight, -(num_classes**-0.5), num_classes**-0.5)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
