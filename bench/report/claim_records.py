"""A published claim as ``claims.toml`` states it, and the file read and checked: one line per bad entry.
:mod:`bench.report.claims` checks the claims against finished runs."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from bench.report.runs import ResultsError

#: The metrics a claim may name: label, unit scale, and whether higher is better. The direction is the
#: metric's: a lower ECE is better calibration, a lower lambda_max a flatter minimum, whatever the claim.
METRICS = {
    "final_test_acc": ("test acc (%)", 100.0, True),
    "final_test_ece": ("test ECE (%)", 100.0, False),
    "final_test_loss": ("test loss", 1.0, False),
    "hessian_max_eigenvalue": ("λ_max", 1.0, False),
}
KINDS = ("beats", "matches_cheaper")
CLAIMS_FILE = Path(__file__).with_name("claims.toml")


@dataclass(frozen=True)
class Claim:
    text: str
    source: str
    a: str
    b: str
    kind: str  # one of KINDS
    metric: str  # one of METRICS
    #: matches_cheaper: the margin in the metric's units, or a fraction of the lower bound of B's paired 95%
    #: interval of gain over margin_reference (not testable where that bound is <= 0)
    margin: float | None = None
    margin_gain: float | None = None
    margin_reference: str | None = None
    #: the paper's regime in words, and what a setting needs to count as in it
    regime: str = ""
    regime_datasets: tuple[str, ...] = ()
    regime_min_epochs: int = 0
    #: the effect the paper reports, in words (from the reference sheet where it has one)
    paper_effect: str = ""
    #: B trains for this many times A's epochs (2: SGD at the forward-backward passes of a two-pass method)
    b_epochs: int = 1
    #: A's own settings that the paper's algorithm sets: a side that runs with one of them unset tests another
    #: form of A (GSAM without rho_min: its schedule-free form), and the claim is not testable there
    a_sets: tuple[str, ...] = ()

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric][2]


_REQUIRED = ("text", "source", "a", "b", "kind", "metric")
_TYPES = {
    "margin": (int, float),
    "margin_gain": (int, float),
    "regime_min_epochs": (int,),
    "regime_datasets": (list,),
    "b_epochs": (int,),
    "a_sets": (list,),
}


def _check_entry(entry: Any, where: str) -> Claim:
    fields = {f.name for f in dataclasses.fields(Claim)}
    if not isinstance(entry, dict):
        raise ResultsError(f"{where}: expected a table")
    missing, unknown = [k for k in _REQUIRED if k not in entry], sorted(set(entry) - fields)
    if missing or unknown:
        raise ResultsError(
            f"{where}: "
            + "; ".join(
                [*(["missing " + ", ".join(missing)] * bool(missing)), *(["unknown " + ", ".join(unknown)] * bool(unknown))]
            )
        )
    for key, value in entry.items():
        kinds = _TYPES.get(key, (str,))
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ResultsError(
                f"{where}: {key} must be {'a number' if float in kinds else 'a list' if list in kinds else 'an integer' if int in kinds else 'text'}"
            )
    if entry["kind"] not in KINDS:
        raise ResultsError(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
    if entry["metric"] not in METRICS:
        raise ResultsError(f"{where}: metric {entry['metric']!r} is not one of {', '.join(METRICS)}")
    fixed, relative = "margin" in entry, "margin_gain" in entry or "margin_reference" in entry
    if entry["kind"] == "matches_cheaper" and fixed == relative:
        raise ResultsError(f"{where}: a matches_cheaper claim needs a margin, or margin_gain with margin_reference")
    if relative and not ("margin_gain" in entry and "margin_reference" in entry):
        raise ResultsError(f"{where}: margin_gain and margin_reference go together")
    if entry["kind"] == "beats" and (fixed or relative):
        raise ResultsError(f"{where}: a beats claim takes no margin")
    if any(entry.get(k, 1) <= 0 for k in ("margin", "margin_gain")):
        raise ResultsError(f"{where}: a margin must be > 0")
    if entry.get("b_epochs", 1) < 1:
        raise ResultsError(f"{where}: b_epochs must be >= 1")
    return Claim(
        **{**entry, "regime_datasets": tuple(entry.get("regime_datasets", ())), "a_sets": tuple(entry.get("a_sets", ()))}
    )


def load_claims(path: Path = CLAIMS_FILE) -> tuple[Claim, ...]:
    """The claims of a TOML file (``[[claim]]`` tables), checked: one line per bad entry."""
    try:
        entries = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("claim", [])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ResultsError(f"{path}: {err}") from None
    claims = tuple(_check_entry(entry, f"{Path(path).name}, claim {i}") for i, entry in enumerate(entries, 1))
    from optimizers import available_optimizers

    known = set(available_optimizers())
    for i, claim in enumerate(claims, 1):
        unknown = [n for n in (claim.a, claim.b, claim.margin_reference) if n is not None and n not in known]
        if unknown:
            raise ResultsError(f"{Path(path).name}, claim {i}: unknown optimizer {unknown[0]!r}")
    return claims
