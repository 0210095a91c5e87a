"""timm architectures as an optional extra: ``create_model("timm:vit_tiny_patch16_224")``.

Needs ``pip install -e ".[timm]"``. The model is ``timm.create_model(NAME, pretrained=False,
num_classes=..., in_chans=...)`` (never downloads weights), wrapped in :class:`TimmModel`, whose
``forward`` resizes any input to the size the model was designed for (the ``input_size`` of its
``pretrained_cfg``, e.g. 224x224) with bilinear interpolation, so 8x8 digits and 32x32 CIFAR go
through the data pipeline unchanged. ``image_size`` overrides that size (a smaller one is much
cheaper on CPU; models with fixed-size position tables, such as timm's ViTs, need their own).
The wrapped model is ``.model``, so its state-dict keys carry a ``model.`` prefix.

timm's attention layers call the fused ``scaled_dot_product_attention`` kernels, which have no
double backward (``--sharpness``'s Hessian-vector products fail on them, on CPU as on GPU), so
the wrapper switches every layer's ``fused_attn`` off: attention is computed from its plain
formula, same result, differentiable twice. ``fused_attention=True`` keeps the fused kernels
(faster and leaner for large token counts; then no ``--sharpness``).
"""

from __future__ import annotations

import difflib

import torch.nn as nn
import torch.nn.functional as F

#: ``--arch timm:NAME`` builds timm's model NAME
PREFIX = "timm:"


def _timm(model_name: str):
    try:
        import timm
    except ImportError:
        raise ValueError(f'--arch {PREFIX}{model_name} needs timm: pip install -e ".[timm]"') from None
    return timm


def resolve_timm(model_name: str) -> tuple[type[nn.Module], dict]:
    """``(TimmModel, {"model_name": model_name})`` for a name timm knows; one-line ValueError otherwise."""
    model_name = model_name.strip()
    timm = _timm(model_name or "NAME")
    if not model_name:
        raise ValueError(f"{PREFIX}NAME needs a timm model name, e.g. {PREFIX}vit_tiny_patch16_224 (see timm.list_models())")
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm architecture {model_name!r} (not in timm.list_models()){hint}")
    return TimmModel, {"model_name": model_name}


class TimmModel(nn.Module):
    """A timm model (random init) whose ``forward`` first resizes inputs to ``image_size``."""

    def __init__(
        self,
        model_name: str,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int | tuple[int, int] | None = None,
        fused_attention: bool = False,
    ):
        super().__init__()
        timm = _timm(model_name)
        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        if image_size is None:
            cfg = getattr(self.model, "pretrained_cfg", None) or getattr(self.model, "default_cfg", None) or {}
            if "input_size" not in cfg:
                raise ValueError(f"timm model {model_name!r} names no input_size; pass image_size")
            image_size = tuple(cfg["input_size"][-2:])
        elif isinstance(image_size, int):
            image_size = (image_size, image_size)
        if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
            raise ValueError(f"image_size must be a positive integer or a (height, width) pair, got {image_size!r}")
        if not fused_attention:
            for module in self.model.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
        self.model_name = model_name
        self.image_size = tuple(image_size)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.model(x)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, image_size={self.image_size}"
