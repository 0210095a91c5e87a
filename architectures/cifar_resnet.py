"""He et al. (2016) CIFAR ResNets: three stages, depth = 6n + 2.

Stages have 16/32/64 channels times ``width`` with strides 1, 2, 2 and ``n``
post-activation basic blocks each.  Where the shape changes the shortcut is a
1x1 conv + BN projection (option B of the paper), so parameter counts are a
little above the published option-A (zero-padding) figures, e.g. ResNet-20
has 272,474 parameters instead of 269,722 (both "0.27M").
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import init_weights
from .registry import register
from .resnet import BasicBlock


@register("resnet110", depth=110)
@register("resnet56", depth=56)
@register("resnet44", depth=44)
@register("resnet32", depth=32)
@register("resnet20", depth=20)
@register("resnet14", depth=14)
@register("resnet8", depth=8)
class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, width: int = 1, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
        if width < 1:
            raise ValueError(f"CIFAR ResNet width must be a positive integer, got {width}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16 * width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16 * width)
        layers, in_planes = [], 16 * width
        for planes, stride in zip([16 * width, 32 * width, 64 * width], [1, 2, 2]):
            for s in [stride] + [1] * (n - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
