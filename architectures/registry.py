"""One registry mapping lowercase architecture names to model classes.

Names are registered with the :func:`register` class decorator, which binds
fixed constructor arguments (``register("resnet18", depth=18)``).  Families
with a numeric naming scheme also register a template with
:func:`register_pattern` (``"wrn{depth}_{widen_factor}"``); every ``{field}``
matches a positive integer handed to the class as the keyword ``field``, next to
the template's own fixed arguments (``register_pattern("vit_tiny_p{patch_size}", dim=64)``).
``timm:NAME`` builds the timm model ``NAME`` (optional extra, see :mod:`.timm_models`).
"""

import inspect
import re

import torch.nn as nn

from .timm_models import PREFIX as TIMM_PREFIX
from .timm_models import resolve_timm

_MODELS: dict[str, tuple[type[nn.Module], dict]] = {}
_PATTERNS: dict[str, tuple[re.Pattern, type[nn.Module], dict]] = {}


def register(name: str, **fixed):
    """Class decorator: ``create_model(name)`` builds ``cls(**fixed)``. Stackable."""
    key = name.lower()

    def decorator(cls):
        if key in _MODELS:
            raise ValueError(f"architecture {key!r} is already registered")
        _MODELS[key] = (cls, fixed)
        return cls

    return decorator


def register_pattern(template: str, **fixed):
    """Class decorator: resolve names matching ``template``, e.g. ``wrn{depth}_{widen_factor}``. Stackable."""
    parts = re.split(r"\{(\w+)\}", template.lower())
    regex = re.compile("".join(rf"(?P<{part}>\d+)" if i % 2 else re.escape(part) for i, part in enumerate(parts)))

    def decorator(cls):
        _PATTERNS[template] = (regex, cls, fixed)
        return cls

    return decorator


def architecture_patterns() -> list[str]:
    """The registered name patterns (``wrn{depth}_{widen_factor}``), each resolving a family of names."""
    return list(_PATTERNS)


def available_architectures() -> list[str]:
    """Sorted list of the explicitly registered names (patterns are not expanded)."""
    return sorted(_MODELS)


def resolve(name: str) -> tuple[type[nn.Module], dict]:
    key = name.lower()
    if key in _MODELS:
        return _MODELS[key]
    if key.startswith(TIMM_PREFIX):
        return resolve_timm(key[len(TIMM_PREFIX) :])
    for regex, cls, fixed in _PATTERNS.values():
        match = regex.fullmatch(key)
        if match:
            return cls, {**fixed, **{field: int(value) for field, value in match.groupdict().items()}}
    raise ValueError(
        f"unknown architecture {name!r}; choose one of: {', '.join(available_architectures())} "
        f"(or a name of the form {', '.join(_PATTERNS)}, or {TIMM_PREFIX}NAME for a timm model)"
    )


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the architecture registered as ``name`` (case-insensitive)."""
    cls, fixed = resolve(name)
    accepted = [p for p in inspect.signature(cls).parameters if p not in fixed]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        bound = ", ".join(f"{k}={v}" for k, v in fixed.items())
        raise ValueError(
            f"architecture {name!r} does not accept {', '.join(unknown)}; "
            f"valid keyword arguments: {', '.join(accepted)}" + (f" (the name fixes {bound})" if fixed else "")
        )
    return cls(num_classes=num_classes, in_channels=in_channels, **fixed, **kwargs)
