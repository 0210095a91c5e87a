"""Published claims about SAM-style optimizers, checked against finished runs.

``python launch.py claims NAME=RUNS ... --out results/claims.md`` reads each setting's runs (a folder
of run directories, or a per-run file ``*_runs.csv``) and checks every claim of ``claims.toml``
whose two optimizers both ran two runs or more there:

- **One setting per side.** Runs are grouped by every result-changing setting: A and B are compared
  only where their data, model and schedule agree, and each setting of A (say two values of rho) is
  its own row, never pooled.
- **Paired intervals.** The difference A - B of the claim's metric (for a metric where lower is
  better, B - A: a positive difference always favours A) with its 95% Student t interval: on the
  per-seed differences of the seeds both sides ran (same initialisation, data order, augmentation
  and label noise; a seed only one side ran is left out, and the cell says so and gives the number of
  pairs), else Welch's unpaired interval (the cell says "Welch"). Per-seed differences (and values)
  spread by no more than 1e-4 (far below one test image) count as constant: no spread, not resolved.
- **Every run counts.** A side with a run that did not complete, or that completed with a non-finite
  metric, makes the claim "not testable here" (a diverged seed never just drops out).
- **Two kinds of claim.** "beats": the null is no difference. "matches_cheaper": A is not worse than
  B by more than the claim's margin, stated in advance: a number of points, or a fraction of the
  LOWER bound of B's paired 95% interval of gain over a reference optimizer in that setting (where
  that bound is <= 0, or the gain has no spread, it is not resolved: "not testable here"); the null is a
  difference of minus the margin.
  Its cost half is the measured step-time ratio A / B of quietly timed runs, with its interval; the
  nominal passes per step are shown beside it and never decide.
- **Holm's correction.** Every test of the report, over all the settings of one command, is one
  family: a finding counts only where its Holm-adjusted p-value (shown in brackets) is below 0.05.
  Otherwise it is "not resolved", with the interval's half-width: the smallest effect this setting
  could have seen.
- **Regime guards.** A side that did not train (test accuracy within 5 points of chance, or a training
  loss above 90% of ln(classes)) makes the claim "not testable here". A finding against a claim reads
  "contradicted" only in the paper's regime as the claim records it, else "not observed at this scale".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.config import RunConfig
from bench.report import stats, tables
from bench.report.claim_records import CLAIMS_FILE, KINDS, METRICS, Claim, load_claims  # noqa: F401 (re-exported)
from bench.report.runs import ResultsError, settings_key

#: lambda_max estimates that power iteration left further from converged than this (its relative residual: some
#: eigenvalue lies within that fraction of the estimate) make a claim on lambda_max not testable
RESIDUAL_LIMIT = 0.05
ALPHA = 0.05
#: a side within this many points of chance accuracy, or with a training loss above this fraction of
#: ln(classes), did not train
CHANCE_POINTS, LOSS_FRACTION = 5.0, 0.9
#: settings only the optimizer reads: A and B may differ in these and still be compared
OPTIMIZER_OWN = tables.OPTIMIZER_OWN + tables.STEP_SETTINGS


# ----------------------------------------------------------------------------- one setting's runs


@dataclass(frozen=True)
class Side:
    """One optimizer at one setting: all its runs (``runs``), and those that completed (``completed``)."""

    optimizer: str
    runs: pd.DataFrame
    label: str  # the settings that tell it apart from the optimizer's other settings here, or ""

    @property
    def completed(self) -> pd.DataFrame:
        return self.runs[self.runs.status == "completed"]

    def values(self, metric: str, orient: float = 1.0) -> dict[int, float]:
        scale = METRICS[metric][1] if metric in METRICS else 1.0
        done = self.completed
        return {int(s): orient * float(v) * scale for s, v in zip(done.seed, done[metric]) if math.isfinite(float(v))}

    def failed(self, metric: str) -> str | None:
        """``k of n runs of X did not complete`` (or have a non-finite metric), or None when every run counts."""
        n, done = len(self.runs), self.completed
        if len(done) < n:
            return f"{n - len(done)} of {n} runs of {self.optimizer} did not complete"
        bad = n - len(self.values(metric))
        if bad == n and done[metric].isna().all():
            return f"{metric} not measured on the runs of {self.optimizer}"
        return f"{bad} of {n} runs of {self.optimizer} have no finite {metric}" if bad else None

    def describe(self, metric: str) -> str:
        v = pd.Series(self.values(metric))
        name = self.optimizer + (f" ({self.label})" if self.label else "")
        return f"{name}: {v.mean():.2f} ± {v.std(ddof=1):.2f} (n={len(v)})"

    def unset(self, names: tuple[str, ...]) -> list[str]:
        """Those of the optimizer's own settings ``names`` that some run of this side left unset (None), as it
        resolved them (an older record without them: as given)."""
        missing = []
        for name in names:
            for resolved, identity in zip(self.runs.variant_settings, self.runs.identity):
                given = (identity.get("hyperparameters") or {}).get(name)
                value = resolved.get(name, given) if isinstance(resolved, dict) else given
                if value is None:
                    missing.append(name)
                    break
        return missing

    def unconverged(self, metric: str) -> str | None:
        """Why this side's lambda_max estimates cannot be compared (power iteration not converged on some run), or
        None; runs recorded without the residual are taken as they are."""
        if metric != "hessian_max_eigenvalue" or "hessian_eigenvalue_residual" not in self.runs:
            return None
        residuals = self.completed.hessian_eigenvalue_residual.astype(float)
        over = residuals[residuals > RESIDUAL_LIMIT]
        if over.empty:
            return None
        return (
            f"λ_max not converged on {len(over)} of {len(residuals)} runs of {self.optimizer} "
            f"(power-iteration residual up to {over.max():.2g}, limit {RESIDUAL_LIMIT})"
        )

    def untrained(self) -> str | None:
        """Why this side did not train, or None."""
        classes = self.runs.num_classes.dropna()
        if classes.empty:
            return None
        k = float(classes.iloc[0])
        acc, loss = self.completed.final_test_acc.mean() * 100, self.completed.final_train_loss.mean()
        if acc < 100 / k + CHANCE_POINTS:
            return f"{self.optimizer} did not train (test acc {acc:.1f}%, chance {100 / k:.0f}%)"
        if math.isfinite(loss) and loss > LOSS_FRACTION * math.log(k):
            return f"{self.optimizer} did not train (training loss {loss:.2f}, ln {k:.0f} = {math.log(k):.2f})"
        return None


def _flat(identity: dict) -> dict[str, Any]:
    flat = {k: v for k, v in identity.items() if k != "hyperparameters"}
    flat.update(identity.get("hyperparameters") or {})
    return flat


def _sides(runs: pd.DataFrame, optimizer: str) -> list[Side]:
    """One side per setting of ``optimizer`` among all its runs; a seed run twice at one setting is refused."""
    mine = runs[runs.optimizer == optimizer]
    groups = [g for _, g in mine.groupby("settings_key", sort=True)]
    flats = [_flat(g.identity.iloc[0]) for g in groups]
    differing = sorted(k for k in set().union(*flats) if len({str(f.get(k, "default")) for f in flats}) > 1) if flats else []
    sides = []
    for group, flat in zip(groups, flats):
        if group.seed.duplicated().any():
            raise ResultsError(f"{optimizer}: two runs with seed {group.seed[group.seed.duplicated()].iloc[0]} at one setting")
        sides.append(Side(optimizer, group, ", ".join(f"{k}={flat.get(k, 'default')}" for k in differing)))
    return sides


def _comparable(a: Side, b: Side, b_epochs: int = 1) -> bool:
    """The same setting but for the optimizer's own settings, and B trained for ``b_epochs`` times A's epochs."""
    ia, ib = a.runs.identity.iloc[0], b.runs.identity.iloc[0]
    if b_epochs == 1:
        return settings_key(ia, OPTIMIZER_OWN) == settings_key(ib, OPTIMIZER_OWN)
    epochs = [int(i.get("epochs", RunConfig.epochs)) for i in (ia, ib)]
    same = settings_key(ia, (*OPTIMIZER_OWN, "epochs")) == settings_key(ib, (*OPTIMIZER_OWN, "epochs"))
    return same and epochs[1] == b_epochs * epochs[0]


def _cost(a: Side, b: Side) -> tuple[str, int]:
    """The measured step-time ratio A / B in words, and its sign: -1 cheaper, +1 dearer, 0 not resolved."""
    done = [s.completed for s in (a, b)]
    quiet = [d[~d.contended.astype(bool) & ~d.oversubscribed.astype(bool) & d.step_time_s.notna()] for d in done]
    if min(len(q) for q in quiet) < 2 or len({t for q in quiet for t in q.timing}) != 1:
        return "not measured (fewer than two quietly timed runs a side at one thread and process count)", 0
    r = stats.ratio(*({int(s): float(t) for s, t in zip(q.seed, q.step_time_s)} for q in quiet))
    if min(q.train_time_s.median() for q in quiet) < tables.MIN_TIMED_S:
        return f"{r.describe()}, runs too short to time (< {tables.MIN_TIMED_S:.0f} s)", 0
    return r.describe(), -1 if r.high < 1 else 1 if r.low > 1 else 0


def _in_regime(claim: Claim, side: Side) -> bool:
    identity = side.runs.identity.iloc[0]
    return identity.get("dataset") in claim.regime_datasets and int(identity.get("epochs") or 0) >= claim.regime_min_epochs


def _evaluate(claim: Claim, a: Side, b: Side, runs: pd.DataFrame) -> dict[str, Any]:
    """The claim on one pair of sides: the numbers, and either a p-value or why it is not testable."""
    orient = 1.0 if claim.higher_is_better else -1.0
    va, vb = a.values(claim.metric, orient), b.values(claim.metric, orient)
    row: dict[str, Any] = {"claim": claim, "a": a, "b": b, "p": None, "why": None, "margin": None, "cost": ("", 0)}
    failed = a.failed(claim.metric) or b.failed(claim.metric)
    if failed or len(va) < 2 or len(vb) < 2:
        row["why"] = failed or f"{claim.metric} missing on some runs"
        return row
    row["difference"] = stats.compare(va, vb)
    unset = a.unset(claim.a_sets)
    form = f"{claim.a} runs without {', '.join(unset)}, which the paper's algorithm sets" if unset else None
    row["why"] = form or a.untrained() or b.untrained() or a.unconverged(claim.metric) or b.unconverged(claim.metric)
    if claim.kind == "matches_cheaper":
        row["cost"] = _cost(a, b)
        if claim.margin is not None:
            row["margin"] = claim.margin
        else:
            references = [r for r in _sides(runs, claim.margin_reference) if _comparable(r, b)]
            reference = references[0] if len(references) == 1 else None
            vr = reference.values(claim.metric, orient) if reference else {}
            if reference is None or len(vr) < 2 or reference.failed(claim.metric):
                row["why"] = row["why"] or f"no single {claim.margin_reference} setting here to set the margin"
            else:
                gain = stats.compare(vb, vr)  # the margin is a fraction of its lower bound: a gain resolved here
                if gain.se > 0 and gain.low > 0:
                    row["margin"] = claim.margin_gain * gain.low
                else:
                    row["why"] = row["why"] or (
                        f"{claim.b} has no resolved gain over {claim.margin_reference} here "
                        f"({gain.describe()} {gain.test()}): no margin"
                    )
    if row["why"] is None:
        row["p"] = row["difference"].p_value(-row["margin"] if claim.kind == "matches_cheaper" else 0.0)
    return row


#: How a compared claim's row (one with an interval) is told apart in a written report: its interval cell ends
#: with the test used.
TESTED_MARKERS = ("] paired", "] Welch")


def _words(row: dict[str, Any]) -> tuple[str, str]:
    """The finding (what the interval says) and the verdict against the paper."""
    if row["p"] is None:
        return "", f"not testable here: {row['why']}"
    claim, d = row["claim"], row["difference"]
    if d.se == 0:
        return "not resolved (no spread across seeds)", "inconclusive"
    if row["p_holm"] >= ALPHA:
        return f"not resolved (±{d.half_width:.2f})", "inconclusive"
    against = "contradicted" if _in_regime(claim, row["a"]) else "not observed at this scale"
    if claim.kind == "beats":
        return ("A better", "reproduced") if d.mean > 0 else ("A worse", against)
    if d.mean < -row["margin"]:
        return "A worse by more than the margin", against
    cost = row["cost"][1]
    verdict = "reproduced" if cost < 0 else against if cost > 0 else "inconclusive (cost not resolved)"
    return "non-inferior", verdict


def evaluate(claims: tuple[Claim, ...], runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Every claim on every comparable pair of settings in one setting's runs, Holm-adjusted as one family."""
    return evaluate_report(claims, [runs])[0]


def evaluate_report(claims: tuple[Claim, ...], settings: list[pd.DataFrame]) -> list[list[dict[str, Any]]]:
    """:func:`evaluate` on each setting's runs, every test of every setting Holm-adjusted as ONE family."""
    report = []
    for runs in settings:
        rows = []
        for claim in claims:
            for a in _sides(runs, claim.a):
                for b in _sides(runs, claim.b):
                    if _comparable(a, b, claim.b_epochs) and len(a.runs) >= 2 and len(b.runs) >= 2:
                        rows.append(_evaluate(claim, a, b, runs))
        report.append(rows)
    tested = [r for rows in report for r in rows if r["p"] is not None]
    for row, adjusted in zip(tested, stats.holm([r["p"] for r in tested])):
        row["p_holm"], row["family"] = adjusted, len(tested)
    for row in (r for rows in report for r in rows):
        row["finding"], row["verdict"] = _words(row)
    return report


def _passes(row: dict[str, Any]) -> str:
    """The nominal forward-backward passes per step of each side (shown, never used for a verdict)."""
    a, b = (row[s].runs.sample_passes_per_step.astype(float).mean() for s in ("a", "b"))
    return f"{a:.2f} vs {b:.2f}" if math.isfinite(a) and math.isfinite(b) else ""


def claims_table(runs: pd.DataFrame, claims: tuple[Claim, ...] | None = None) -> pd.DataFrame:
    """One row per (claim, pair of settings) in one setting's runs, as text for the report."""
    return claims_table_of(evaluate(load_claims() if claims is None else claims, runs))


def claims_table_of(evaluated: list[dict[str, Any]]) -> pd.DataFrame:
    """:func:`evaluate`'s rows as text."""
    rows = []
    for r in evaluated:
        claim, d = r["claim"], r.get("difference")
        rows.append(
            {
                "claim": claim.text,
                "source": claim.source,
                "metric": METRICS[claim.metric][0],
                "A": r["a"].describe(claim.metric),
                "B": r["b"].describe(claim.metric),
                "gain for A [95% CI]": "" if d is None else f"{d.describe()} {d.test()}",
                "p (Holm)": "" if r["p"] is None else f"{r['p']:.3f} ({r['p_holm']:.3f})",
                "margin": "" if r["margin"] is None else f"{r['margin']:.2f}",
                "step time A/B [95% CI]": r["cost"][0],
                "passes/step A vs B": _passes(r) if claim.kind == "matches_cheaper" else "",
                "finding": r["finding"],
                "verdict": r["verdict"],
            }
        )
    return pd.DataFrame(rows)
