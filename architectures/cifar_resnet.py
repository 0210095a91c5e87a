"""He et al. (2016) CIFAR ResNets: three stages, depth = 6n + 2.

Stages have 16/32/64 channels times ``width`` with strides 1, 2, 2 and ``n``
post-activation basic blocks each.  Where the shape changes the shortcut is a
1x1 conv + BN projection (option B of the paper), so parameter counts are a
little above the published option-A (zero-padding) figures, e.g. ResNet-20
has 272,474 parameters instead of 269,722 (both "0.27M").
"""

from .registry import register
from .resnet import BasicBlock, StagedResNet


@register("resnet110", depth=110)
@register("resnet56", depth=56)
@register("resnet44", depth=44)
@register("resnet32", depth=32)
@register("resnet20", depth=20)
@register("resnet14", depth=14)
@register("resnet8", depth=8)
class CifarResNet(StagedResNet):
    def __init__(self, depth: int = 20, width: int = 1, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
        if width < 1:
            raise ValueError(f"CIFAR ResNet width must be a positive integer, got {width}")
        n = (depth - 2) // 6
        self.build(in_channels, 16 * width, BasicBlock, [16 * width, 32 * width, 64 * width], [n] * 3, [1, 2, 2], num_classes)
