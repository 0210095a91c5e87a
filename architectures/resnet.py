"""ResNet-18/34/50/101/152 in the common CIFAR variant (kuangliu/pytorch-cifar).

A 3x3 stride-1 stem with 64 channels and no max-pool, then four stages of
64/128/256/512 channels with strides 1, 2, 2, 2.  Shortcuts are identity, or a
1x1 conv + BN where the shape changes.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import init_weights
from .registry import register


class BasicBlock(nn.Module):
    """Two 3x3 convs (post-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


_CONFIGS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


class StagedResNet(nn.Module):
    """3x3 stem (no max-pool), stages of residual blocks, global average pool, linear head:
    the shape shared by the CIFAR ResNets here."""

    def build(self, in_channels: int, stem: int, block, widths, num_blocks, strides, num_classes: int) -> None:
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, in_planes = [], stem
        for planes, blocks, stride in zip(widths, num_blocks, strides):
            for s in [stride] + [1] * (blocks - 1):
                layers.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register("resnet152", depth=152)
@register("resnet101", depth=101)
@register("resnet50", depth=50)
@register("resnet34", depth=34)
@register("resnet18", depth=18)
class ResNet(StagedResNet):
    def __init__(self, depth: int = 18, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth not in _CONFIGS:
            raise ValueError(f"ResNet depth must be one of {sorted(_CONFIGS)}, got {depth}")
        block, num_blocks = _CONFIGS[depth]
        self.build(in_channels, 64, block, [64, 128, 256, 512], num_blocks, [1, 2, 2, 2], num_classes)
