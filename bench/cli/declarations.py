"""What the registries declare that the command line shows: the optimizers, the architectures, and the
variant flags (``--rho``, ``--k``, ...) generated from the variants' declared settings, spelled as
``variant_flags.toml`` says (see :mod:`bench.variant_flags`).

:func:`from_declarations` builds the table from ``optimizers`` and ``architectures`` (which import
torch); ``declarations.json`` beside this file holds the same table, so that building the parser, and
``python launch.py --help``, import no torch. ``python launch.py variants --json`` prints it; a test
checks that the file equals the declarations, and CONTRIBUTING.md says when to rewrite it.

The table: ``{"optimizers": [name, ...], "architectures": [name or pattern, ...],
"flags": {flag: {"kind": "bool"|"int"|"float", "help": text}}, "variants": {name: [flag, ...]}}``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

JSON_PATH = Path(__file__).with_name("declarations.json")


def _help(uses: list[tuple[str, Any]]) -> str:
    by_meaning: dict[tuple[str, str], list[str]] = defaultdict(list)
    for variant, s in uses:
        by_meaning[(s.symbol or s.name, s.help)].append(variant)
    return "; ".join(f"{', '.join(v)}: {name}" + (f" ({text})" if text else "") for (name, text), v in by_meaning.items())


def _kind(settings: list) -> str:
    kinds = {s.kind for s in settings}
    return "bool" if kinds == {bool} else "int" if kinds == {int} else "float"


def from_declarations() -> dict[str, Any]:
    """The table, from the registries and every registered optimizer's declared settings."""
    from architectures.registry import architecture_patterns, available_architectures
    from bench.variant_flags import setting_flags
    from optimizers import available_optimizers

    uses: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    variants = {}
    for name in available_optimizers():
        flags = setting_flags(name)
        if flags:
            variants[name] = sorted(flags)
        for flag, setting in flags.items():
            uses[flag].append((name, setting))
    flags = {flag: {"kind": _kind([s for _, s in uses[flag]]), "help": _help(uses[flag])} for flag in sorted(uses)}
    return {
        "optimizers": available_optimizers(),
        "architectures": [*available_architectures(), *architecture_patterns()],
        "flags": flags,
        "variants": variants,
    }


def to_json(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


@cache
def load() -> dict[str, Any]:
    """The table as written in ``declarations.json``."""
    return json.loads(JSON_PATH.read_text())


def names() -> list[str]:
    """Every variant flag, without the dashes."""
    return sorted(load()["flags"])
