"""A two-layer perceptron: no BatchNorm, so a sample's gradient does not depend on the
batch it sits in (the gradient-accumulation and data-parallel equivalence tests rely
on it). Inputs are average-pooled to 8x8 first, so any image size works."""

from torch import nn

from .registry import register


@register("mlp")
class MLP(nn.Sequential):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 64):
        super().__init__(
            nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
