"""A tiny CNN (about 57k parameters) for fast CPU test suites."""

import torch
import torch.nn as nn

from .common import init_weights
from .registry import register


def _conv_bn_relu(in_planes: int, planes: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


@register("smallcnn")
class SmallCNN(nn.Module):
    """conv32 - conv64 - max-pool - conv64 - global average pool - linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 32),
            _conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            _conv_bn_relu(64, 64),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))
