"""One registry, one factory: optimizers by name; and the variant table of docs/variants.md, generated."""

from __future__ import annotations

from typing import Any

import torch

from .ae_sam import AESAM
from .arwp import ARWP
from .asam import ASAM
from .base import BASE_OPTIMIZERS, SharpnessAwareOptimizer, resolve_base_optimizer, split_params_and_model
from .bsam import BayesianSAM
from .esam import ESAM
from .fisher_sam import FisherSAM
from .friendly_sam import FriendlySAM
from .gam import GAM
from .gsam import GSAM
from .lookbehind_sam import LookbehindSAM
from .looksam import LookLayerSAM, LookSAM
from .msam import MSAM
from .saf import MESA, SAF
from .sagm import SAGM
from .sam import SAM, AdaptiveSAM
from .sam_on import ASAMON, SAMON
from .settings import Setting
from .ss_sam import SSSAM
from .vasso import VaSSO
from .wsam import WSAM

#: The method the variants are measured against (Foret et al.'s SAM).
REFERENCE = "sam"

#: canonical name -> class, in registration order
_REGISTRY: dict[str, type[torch.optim.Optimizer]] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register(name: str, cls: type[torch.optim.Optimizer], aliases: tuple[str, ...] = ()) -> None:
    """Register ``cls`` under ``name`` (and ``aliases``); a name or alias already taken is an error, never overwritten."""
    taken = [alias for alias in (name, *aliases) if _key(alias) in _ALIASES]
    if taken:
        raise ValueError(
            f"optimizer name(s) {', '.join(map(repr, taken))} already registered "
            f"(to {', '.join(sorted({_ALIASES[_key(a)] for a in taken}))}); choose another name"
        )
    _REGISTRY[name] = cls
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
    return _REGISTRY[canonical_name(name)]


def is_sharpness_aware(name: str) -> bool:
    return issubclass(optimizer_class(name), SharpnessAwareOptimizer)


def steps_with_sgd(name: str, base="sgd") -> bool:
    """Whether ``create_optimizer(name, ..., base=base)`` updates with torch's SGD, and so takes SGD's settings
    (momentum, dampening, nesterov): SGD itself, or a variant that steps with its base optimizer, SGD."""
    cls = optimizer_class(name)
    if issubclass(cls, SharpnessAwareOptimizer):
        return cls.uses_base_optimizer and issubclass(resolve_base_optimizer(base), torch.optim.SGD)
    return issubclass(cls, torch.optim.SGD)


def create_optimizer(name: str, params, base="sgd", **kwargs: Any) -> torch.optim.Optimizer:
    """A ready optimizer for a registered name (case-insensitive).

    "sgd", "adamw" and "adam" are the plain torch optimizers (``base`` does not apply
    to them); every other name is a sharpness-aware variant wrapping ``base``.
    ``params`` may be the model itself. Keyword arguments are the variant's
    hyperparameters (rho, ...) and the base optimizer's (lr, momentum, ...).
    """
    cls = _REGISTRY[canonical_name(name)]
    if not issubclass(cls, SharpnessAwareOptimizer):
        params, _ = split_params_and_model(params, None)
        try:
            return cls(params, **kwargs)
        except TypeError as err:
            raise ValueError(f"{cls.__name__}: {err}") from None
    return cls(params, base, **kwargs)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _defaults(settings: tuple[Setting, ...]) -> str:
    """``rho 0.5, eta 0.01 (source)``: consecutive settings with one source share it."""
    parts: list[str] = []
    for i, setting in enumerate(settings):
        if setting.default is None:  # derived: the source says from what
            parts.append(f"{setting.name} = {setting.source or 'derived'}")
            continue
        text = f"{setting.name} {setting.default}"
        last_of_source = i + 1 == len(settings) or settings[i + 1].source != setting.source
        if setting.source and last_of_source:
            text += f" ({setting.source})"
        parts.append(text)
    return ", ".join(parts)


def variants_markdown() -> str:
    """The table of variants in docs/variants.md, from each class's declarations."""
    lines = [
        "| name | paper | update rule (see the file's docstring) | defaults (source) | extra memory | passes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, cls in _REGISTRY.items():
        if not issubclass(cls, SharpnessAwareOptimizer):
            continue
        memory = f"{cls.extra_memory} ({cls.memory_note})" if cls.memory_note else str(cls.extra_memory)
        cells = [f"`{name}`", cls.paper, cls.rule, _defaults(cls.settings), memory, cls.passes]
        lines.append("| " + " | ".join(_escape(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


for _name, _cls in BASE_OPTIMIZERS.items():
    register(_name, _cls)
register("sam", SAM)
register("adaptive_sam", AdaptiveSAM)
register("asam", ASAM)
register("esam", ESAM)
register("gsam", GSAM)
register("fisher_sam", FisherSAM)
register("bsam", BayesianSAM, aliases=("bayesian_sam",))
register("friendly_sam", FriendlySAM)
register("looksam", LookSAM)
register("look_layer_sam", LookLayerSAM)
register("saf", SAF)
register("mesa", MESA)
register("msam", MSAM, aliases=("momentum_sam",))
register("wsam", WSAM, aliases=("weighted_sam",))
register("sam_on", SAMON)
register("asam_on", ASAMON)
register("vasso", VaSSO)
register("sagm", SAGM)
register("gam", GAM)
register("ss_sam", SSSAM)
register("ae_sam", AESAM)
register("lookbehind_sam", LookbehindSAM)
register("arwp", ARWP)
