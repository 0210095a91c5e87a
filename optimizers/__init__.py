"""SAM and its variants behind one interface.

>>> opt = create_optimizer("sam", model, lr=0.1, momentum=0.9, weight_decay=5e-4)
>>> loss = opt.step(closure)   # closure(): zero grads, forward, backward, return loss
"""

from .base import BASE_OPTIMIZERS, SharpnessAwareOptimizer
from .closure import BatchClosure
from .registry import available_optimizers, create_optimizer, optimizer_class, register, variants_markdown
from .settings import Setting

__all__ = [
    "BASE_OPTIMIZERS",
    "BatchClosure",
    "Setting",
    "SharpnessAwareOptimizer",
    "available_optimizers",
    "create_optimizer",
    "optimizer_class",
    "register",
    "variants_markdown",
]
