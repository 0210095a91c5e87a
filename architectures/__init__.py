"""Model zoo for the SAM benchmarks: one registry, one factory, names as strings.

>>> model = create_model("resnet18", num_classes=100)
>>> model = create_model("wrn28_10", dropout=0.3)       # wrn{depth}_{widen_factor}
>>> model = create_model("pyramidnet164_48")            # pyramidnet{depth}_{alpha}
>>> model = create_model("vit_tiny_p4", in_channels=1)  # any input size, 8x8 digits included
>>> model = create_model("fastnet")                     # whitening conv net for minute-scale GPU studies
>>> model = create_model("resnet50_imagenet")           # torchvision's ImageNet ResNet-50
>>> model = create_model("timm:resnet10t")              # needs pip install -e ".[timm]"
"""

from .cifar_resnet import CifarResNet
from .fastnet import FastNet
from .imagenet_resnet import ImageNetResNet
from .mlp import MLP
from .pyramidnet import PyramidNet
from .registry import available_architectures, create_model, register, register_pattern
from .resnet import ResNet
from .smallcnn import SmallCNN
from .timm_models import TimmModel
from .vit import VisionTransformer
from .wideresnet import WideResNet

__all__ = [
    "available_architectures",
    "create_model",
    "register",
    "register_pattern",
    "CifarResNet",
    "FastNet",
    "ImageNetResNet",
    "MLP",
    "PyramidNet",
    "ResNet",
    "SmallCNN",
    "TimmModel",
    "VisionTransformer",
    "WideResNet",
]
