"""SAM and its variants behind one interface.

>>> opt = create_optimizer("sam", model, lr=0.1, momentum=0.9, weight_decay=5e-4)
>>> loss = opt.step(closure)   # closure(): zero grads, forward, backward, return loss

The names below are imported on first use, so that ``optimizers.settings`` (the declarations'
vocabulary) can be read without importing torch.
"""

from importlib import import_module

__version__ = "0.2.0"

_WHERE = {
    "BASE_OPTIMIZERS": "base",
    "SharpnessAwareOptimizer": "base",
    "BatchClosure": "closure",
    "Setting": "settings",
    "available_optimizers": "registry",
    "create_optimizer": "registry",
    "optimizer_class": "registry",
    "register": "registry",
    "steps_with_sgd": "registry",
    "variants_markdown": "registry",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'optimizers' has no attribute {name!r}")
    value = getattr(import_module(f"optimizers.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_WHERE])
