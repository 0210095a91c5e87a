"""One registry, one factory: optimizers by name."""

from __future__ import annotations

from typing import Any

import torch

from .asam import ASAM
from .base import BASE_OPTIMIZERS, SharpnessAwareOptimizer, split_params_and_model
from .bsam import BayesianSAM
from .esam import ESAM
from .fisher_sam import FisherSAM
from .friendly_sam import FriendlySAM
from .gsam import GSAM
from .looksam import LookLayerSAM, LookSAM
from .sam import SAM

#: canonical name -> (class, preset keyword arguments)
_REGISTRY: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register(name: str, cls: type[torch.optim.Optimizer], aliases: tuple[str, ...] = (), **preset: Any) -> None:
    _REGISTRY[name] = (cls, preset)
    for alias in (name, *aliases):
        _ALIASES[_key(alias)] = name


def canonical_name(name: str) -> str:
    try:
        return _ALIASES[_key(name)]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(available_optimizers())}") from None


def available_optimizers() -> list[str]:
    return list(_REGISTRY)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    return _REGISTRY[canonical_name(name)][0]


def is_sharpness_aware(name: str) -> bool:
    return issubclass(optimizer_class(name), SharpnessAwareOptimizer)


def create_optimizer(name: str, params, base="sgd", **kwargs: Any) -> torch.optim.Optimizer:
    """A ready optimizer for a registered name (case-insensitive).

    "sgd", "adamw" and "adam" are the plain torch optimizers (``base`` does not apply
    to them); every other name is a sharpness-aware variant wrapping ``base``.
    ``params`` may be the model itself. Keyword arguments are the variant's
    hyperparameters (rho, ...) and the base optimizer's (lr, momentum, ...).
    """
    cls, preset = _REGISTRY[canonical_name(name)]
    kwargs = {**preset, **kwargs}
    if not issubclass(cls, SharpnessAwareOptimizer):
        params, _ = split_params_and_model(params, None)
        try:
            return cls(params, **kwargs)
        except TypeError as err:
            raise ValueError(f"{cls.__name__}: {err}") from None
    return cls(params, base, **kwargs)


for _name, _cls in BASE_OPTIMIZERS.items():
    register(_name, _cls)
register("sam", SAM)
register("adaptive_sam", SAM, adaptive=True, rho=2.0)
register("asam", ASAM)
register("esam", ESAM)
register("gsam", GSAM)
register("fisher_sam", FisherSAM)
register("bsam", BayesianSAM, aliases=("bayesian_sam",))
register("friendly_sam", FriendlySAM)
register("looksam", LookSAM)
register("look_layer_sam", LookLayerSAM)
