"""The ImageNet ResNets (He et al. 2016) as torchvision builds them, random init, no download.

``resnet{depth}_imagenet`` for depth 18, 34, 50, 101 or 152: a 7x7 stride-2 stem and a 3x3
max-pool, then four stages with strides 1, 2, 2, 2 (torchvision's ``ResNet``: stride on the
3x3 conv of a bottleneck, "ResNet v1.5"). ResNet-50 has 25.56M parameters for 1,000 classes.
Made for 224x224 inputs; the CIFAR-style ``resnet18`` ... ``resnet152`` are the small-image ones.
"""

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from .registry import register_pattern

_LAYOUTS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


@register_pattern("resnet{depth}_imagenet")
class ImageNetResNet(TorchvisionResNet):
    """torchvision's ResNet of ``depth`` with ``num_classes`` outputs and ``in_channels`` input channels."""

    def __init__(self, depth: int, num_classes: int = 1000, in_channels: int = 3):
        if depth not in _LAYOUTS:
            raise ValueError(f"resnet{{depth}}_imagenet: depth must be one of {', '.join(map(str, _LAYOUTS))}, got {depth}")
        block, layers = _LAYOUTS[depth]
        super().__init__(block, layers, num_classes=num_classes)
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.depth = depth
