"""How a variant declares its settings: one :class:`Setting` per hyperparameter.

A variant lists every setting it takes in ``settings`` on its class: name, default,
valid range and the source of the default. Everything else is generated from that list:
the optimizer's validation (the same one-line errors however the optimizer is built),
its defaults, the variant table of docs/variants.md, and whatever a caller builds on it (a command
line's flags and their help).

Per-group settings (``per_group=True``, the default) live in each param group and may
differ between groups, like ``lr``; the others are one value for the whole optimizer
(LookSAM's ``k``, ESAM's ``gamma``) and become attributes of the optimizer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_RANGE = re.compile(r"^\s*([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Setting:
    """One hyperparameter of a variant.

    ``kind``: ``float``, ``int``, ``bool`` or ``tuple`` (a pair of floats, e.g. betas).
    ``range``: an interval such as ``"[0, inf)"`` or ``"(0, 1]"`` that numbers (and each
    element of a tuple) must lie in. ``optional``: ``None`` is a valid value (it means
    "derive it", as GSAM's rho_min). ``source``: where the default comes from.
    ``symbol``: the paper's name for it where this project's differs.
    """

    name: str
    default: Any
    kind: type = float
    range: str | None = None
    help: str = ""
    source: str = ""
    per_group: bool = True
    optional: bool = False
    symbol: str | None = None

    def __post_init__(self):
        if self.range is not None and not _RANGE.match(self.range):
            raise ValueError(f"setting {self.name}: bad range {self.range!r} (write e.g. '[0, inf)' or '(0, 1]')")

    def check(self, value: Any, owner: str = "") -> Any:
        """``value`` if valid (ints widened to float where a float is expected); else one-line ValueError."""
        where = f"{owner}: " if owner else ""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"{where}{self.name} must be set (got None)")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}{self.name} must be true or false, got {value!r}")
            return value
        if self.kind is tuple:
            if not isinstance(value, (tuple, list)) or len(value) != len(self.default):
                raise ValueError(f"{where}{self.name} must be a sequence of {len(self.default)} numbers, got {value!r}")
            return tuple(self._number(v, float, where) for v in value)
        return self._number(value, self.kind, where)

    def _number(self, value: Any, kind: type, where: str) -> Any:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if kind is int and not is_int:
            raise ValueError(f"{where}{self.name} must be an integer{self._range_text()}, got {value!r}")
        if kind is float and not (is_int or isinstance(value, float)):
            raise ValueError(f"{where}{self.name} must be a number{self._range_text()}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{where}{self.name} must be a finite number{self._range_text()}, got {value!r}")
        if self.range is not None and not self._in_range(value):
            kind_text = "an integer " if kind is int else ""
            raise ValueError(f"{where}{self.name} must be {kind_text}{self.range_text()}, got {value!r}")
        return float(value) if kind is float else value

    def _in_range(self, value: float) -> bool:
        left, low, high, right = _RANGE.match(self.range).groups()
        low, high = float(low), float(high)
        above = value > low if left == "(" else value >= low
        below = value < high if right == ")" else value <= high
        return above and below

    def _range_text(self) -> str:
        return f" {self.range_text()}" if self.range and self.range_text() != "finite" else ""

    def range_text(self) -> str:
        """The range in words: ">= 0", "> 0", "in (0, 1]"."""
        left, low, high, _ = _RANGE.match(self.range).groups()
        if low == "-inf" and high == "inf":
            return "finite"
        if high == "inf":
            low_text = low if float(low) != int(float(low)) else str(int(float(low)))
            return f"{'>=' if left == '[' else '>'} {low_text}"
        return f"in {self.range}"

    def describe(self) -> str:
        """``rho 0.05 (paper, CIFAR-10)`` for tables and help."""
        default = "derived" if self.default is None else self.default
        return f"{self.name} {default}" + (f" ({self.source})" if self.source else "")
