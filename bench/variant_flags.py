"""The command-line spellings of the variants' settings, from ``bench/cli/variant_flags.toml``.

The rule is that setting NAME is set by ``--NAME``; the file lists only the exceptions, keyed by
registered variant, then setting: ``flag`` (another spelling), ``aliases`` (the seed project's extra
spellings), ``cli = false`` (not on the command line), ``filled_by`` (a quantity the harness supplies
when the user does not) and ``selects`` (for a boolean, the variant that setting it true runs instead).

An entry holds for its variant and for every variant whose class inherits that very setting (the same
declaration: LookLayerSAM takes LookSAM's); a class that declares the setting anew starts from the
rule (GSAM's ``adaptive`` is its own, so sam's ``selects`` is not GSAM's). The file is read and
checked once, on first use; a bad entry is one line of error.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from bench.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TOML_PATH = Path(__file__).parent / "cli" / "variant_flags.toml"
#: the quantities ``filled_by`` may name
QUANTITIES = ("num_train", "total_steps")
KEYS = ("flag", "aliases", "cli", "filled_by", "selects")


class VariantFlagsError(UserError):
    """A bad entry in the spellings file, in one line."""


def _registry():
    from optimizers import registry  # imports torch: only when a spelling is asked for

    return registry


def _declared(cls, name: str):
    """The Setting ``cls`` has for ``name``, or None."""
    return next((s for s in getattr(cls, "settings", ()) if s.name == name), None)


def parse(text: str, where: str = TOML_PATH.name) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> setting -> entry, checked against the registry; VariantFlagsError names the first bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise VariantFlagsError(f"{where}: {err}") from None
    registered = _registry().available_optimizers()
    for variant, entries in data.items():
        if variant not in registered:
            try:
                known = f"write its registered name, [{_registry().canonical_name(variant)}]"
            except ValueError:
                known = f"registered: {', '.join(registered)}"
            raise VariantFlagsError(f"{where}: [{variant}]: no optimizer registered as {variant!r} ({known})")
        cls = _registry().optimizer_class(variant)
        if not isinstance(entries, dict):
            raise VariantFlagsError(f"{where}: [{variant}] must be a table of settings")
        for name, entry in entries.items():
            _check_entry(f"{where}: [{variant}] {name}", _declared(cls, name), entry, variant, registered)
    for variant in registered:  # one flag, one setting
        seen: dict[str, str] = {}
        for s in getattr(_registry().optimizer_class(variant), "settings", ()):
            for flag in _spellings(_registry().optimizer_class(variant), s, data):
                if seen.setdefault(flag, s.name) != s.name:
                    raise VariantFlagsError(f"{where}: {variant}: --{flag} would set both {seen[flag]} and {s.name}")
    return data


def _check_entry(where: str, setting, entry: Any, variant: str, registered: list[str]) -> None:
    if setting is None:
        declared = ", ".join(s.name for s in getattr(_registry().optimizer_class(variant), "settings", ()))
        raise VariantFlagsError(f"{where}: {variant} declares no such setting (it declares: {declared or 'none'})")
    if not isinstance(entry, dict):
        raise VariantFlagsError(f'{where}: write a table, e.g. {{ flag = "..." }}')
    unknown = [k for k in entry if k not in KEYS]
    if unknown:
        raise VariantFlagsError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    flag, aliases = entry.get("flag", setting.name), entry.get("aliases", [])
    if not (isinstance(flag, str) and flag.isidentifier()):
        raise VariantFlagsError(f"{where}: flag must be a name without dashes, got {flag!r}")
    if not (isinstance(aliases, list) and all(isinstance(a, str) and a.isidentifier() for a in aliases)):
        raise VariantFlagsError(f"{where}: aliases must be a list of names without dashes, got {aliases!r}")
    if not isinstance(entry.get("cli", True), bool):
        raise VariantFlagsError(f"{where}: cli must be true or false, got {entry['cli']!r}")
    if entry.get("cli") is False and ("flag" in entry or "aliases" in entry or "selects" in entry):
        raise VariantFlagsError(f"{where}: cli = false takes no flag, aliases or selects")
    if "filled_by" in entry and entry["filled_by"] not in QUANTITIES:
        raise VariantFlagsError(f"{where}: filled_by must be one of {', '.join(QUANTITIES)}, got {entry['filled_by']!r}")
    if "selects" in entry and (setting.kind is not bool or entry["selects"] not in registered):
        raise VariantFlagsError(f"{where}: selects needs a boolean setting and a registered optimizer, got {entry['selects']!r}")


@cache
def table() -> dict[str, dict[str, dict[str, Any]]]:
    """The checked content of ``variant_flags.toml``, read once."""
    return parse(TOML_PATH.read_text())


def _entry(cls, setting, data) -> dict[str, Any]:
    """The entry for ``setting`` of ``cls``: the nearest registered class in its MRO holding that very setting."""
    registry = _registry()
    for base in cls.__mro__:
        if _declared(base, setting.name) is not setting:
            continue
        for name in registry.available_optimizers():
            if registry.optimizer_class(name) is base and setting.name in data.get(name, {}):
                return data[name][setting.name]
    return {}


def _spellings(cls, setting, data) -> tuple[str, ...]:
    entry = _entry(cls, setting, data)
    if entry.get("cli") is False:
        return ()
    return (entry.get("flag", setting.name), *entry.get("aliases", ()))


def _class(variant):
    return _registry().optimizer_class(variant) if isinstance(variant, str) else variant


def setting_flags(variant) -> dict[str, Any]:
    """flag (without the dashes) -> Setting, for a registered name or an optimizer class."""
    cls = _class(variant)
    return {flag: s for s in getattr(cls, "settings", ()) for flag in _spellings(cls, s, table())}


def filled_by(variant, name: str) -> str | None:
    """The quantity (num_train, total_steps) the harness supplies for setting ``name`` when the user does not."""
    cls = _class(variant)
    setting = _declared(cls, name)
    return None if setting is None else _entry(cls, setting, table()).get("filled_by")


def selects(variant, name: str) -> str | None:
    """For a boolean setting, the registered variant that setting it true on the command line runs instead."""
    cls = _class(variant)
    setting = _declared(cls, name)
    return None if setting is None else _entry(cls, setting, table()).get("selects")
