"""Model zoo for the SAM benchmarks: one registry, one factory, names as strings.

>>> model = create_model("resnet18", num_classes=100)
>>> model = create_model("wrn28_10", dropout=0.3)       # wrn{depth}_{widen_factor}
>>> model = create_model("pyramidnet164_48")            # pyramidnet{depth}_{alpha}
"""
from .cifar_resnet import CifarResNet
from .mlp import MLP
from .pyramidnet import PyramidNet
from .registry import available_architectures, create_model, register, register_pattern
from .resnet import ResNet
from .smallcnn import SmallCNN
from .wideresnet import WideResNet

__all__ = [
    "available_architectures", "create_model", "register", "register_pattern",
    "CifarResNet", "MLP", "PyramidNet", "ResNet", "SmallCNN", "WideResNet",
]
