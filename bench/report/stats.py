"""Interval estimates for comparing two optimizers over seeds, and their correction for many tests.

- :func:`compare`: the mean difference A - B with a 95% Student t interval. Paired (per-seed
  differences, n - 1 degrees of freedom) on the seeds both sides ran, which in this harness share the
  initialisation, the data order, the augmentation and the label-noise draw; otherwise Welch's unpaired
  interval (Welch-Satterthwaite degrees of freedom). Values whose spread is within :data:`TOLERANCE`
  count as constant: accuracies are stored as float32 k/N, so "one image better on every seed" must
  read as no spread whatever k is, not as a spread of float32 rounding.
- :meth:`Difference.p_value`: the two-sided p-value of "the difference is ``null``" (0 for "A beats
  B", minus a margin for "A is not worse than B by more than the margin").
- :func:`holm`: Holm's step-down adjustment of a family of p-values (every test of one report).
- :func:`ratio`: a cost ratio A / B with its interval, on the log scale.
- :func:`aggregate`: across settings: the mean of the per-setting mean differences with a stratified
  Student t interval (SE = sqrt(sum of the per-setting se^2) / S, Welch-Satterthwaite degrees of
  freedom), and the probability of improvement of rliable (Agarwal et al., NeurIPS'21) with a
  stratified bootstrap 95% interval (seeds resampled within each setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95
#: bootstrap resamples of :func:`aggregate`, drawn from a fixed seed so a table regenerates byte for byte
BOOTSTRAP = 2000
#: values (and per-seed differences) spread by no more than this, in the metric's units, count as constant:
#: float32 rounding of an accuracy k/N is below 1e-5 points, one test image of 10,000 is 0.01 points
TOLERANCE = 1e-4


def steady(values) -> np.ndarray:
    """``values`` as floats, rounded to 6 decimals; all set to their mean when their spread is within TOLERANCE."""
    v = np.round(np.asarray(values, dtype=float), 6)
    return np.full_like(v, round(float(v.mean()), 6)) if len(v) and np.ptp(v) <= TOLERANCE else v


@dataclass(frozen=True)
class Difference:
    """A - B over seeds: the mean, its standard error, degrees of freedom, and the 95% interval."""

    mean: float
    se: float
    df: float
    n_a: int
    n_b: int
    paired: bool
    #: values of A and of B left out of a paired interval (their seed ran on one side only)
    left_out_a: int = 0
    left_out_b: int = 0

    @property
    def half_width(self) -> float:
        """Half the 95% interval's width: the smallest difference this comparison could have resolved."""
        return float(stats.t.ppf(0.5 + LEVEL / 2, self.df)) * self.se if self.se > 0 else 0.0

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def p_value(self, null: float = 0.0) -> float:
        """Two-sided p-value of "the true difference is ``null``"."""
        if self.se == 0:
            return 1.0  # no spread (identical per-seed differences): a t test has nothing to go on
        return float(2 * stats.t.sf(abs(self.mean - null) / self.se, self.df))

    def describe(self) -> str:
        """``+1.51 [-0.76, +3.78]`` (paired) for a table cell."""
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"

    def test(self) -> str:
        """The test behind the interval and its n: ``paired, 3 pairs``, with the seeds left out, or ``Welch``."""
        if not self.paired:
            return f"Welch (unpaired: fewer than two seeds shared; n={self.n_a} vs {self.n_b})"
        left = [f"{n} of {side}" for n, side in ((self.left_out_a, "A"), (self.left_out_b, "B")) if n]
        return f"paired, {self.n_a} pairs" + (f" ({' and '.join(left)} unpaired, left out)" if left else "")


def compare(a: Mapping[int, float], b: Mapping[int, float]) -> Difference:
    """A - B from per-seed values (seed -> value): paired on the seeds both sides ran when there are two
    or more (a seed only one side ran is left out), else Welch's on all of them.

    ValueError when a side has fewer than two values (no spread, no interval)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"an interval needs two runs or more per side (got {len(a)} and {len(b)})")
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:  # a seed only one side ran has no partner: left out
        d = steady([a[s] - b[s] for s in shared])
        se = float(d.std(ddof=1) / math.sqrt(len(d)))
        return Difference(float(d.mean()), se, len(d) - 1.0, len(d), len(d), True, len(a) - len(d), len(b) - len(d))
    va, vb = steady(list(a.values())), steady(list(b.values()))
    sa, sb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
    se = math.sqrt(sa + sb)
    denominator = sa**2 / (len(va) - 1) + sb**2 / (len(vb) - 1)
    df = (sa + sb) ** 2 / denominator if denominator > 0 else len(va) + len(vb) - 2.0
    return Difference(float(va.mean() - vb.mean()), se, float(df), len(va), len(vb), False)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values (same order as given): controls the chance of any false finding in the family."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Ratio:
    """A / B of a positive quantity (a step time): the geometric-mean ratio and its 95% interval."""

    value: float
    low: float
    high: float
    paired: bool

    def describe(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def ratio(a: Mapping[int, float], b: Mapping[int, float]) -> Ratio:
    """The ratio of two sides' values with its interval, from :func:`compare` on their logarithms."""
    d = compare({s: math.log(v) for s, v in a.items()}, {s: math.log(v) for s, v in b.items()})
    return Ratio(math.exp(d.mean), math.exp(d.low), math.exp(d.high), d.paired)


@dataclass(frozen=True)
class Aggregate:
    """One claim across settings: the mean of the per-setting mean differences with its stratified t
    interval, and the probability that a run of A beats a run of B in the same setting (ties count half)
    with its stratified bootstrap interval."""

    settings: int
    mean: float
    mean_low: float
    mean_high: float
    improvement: float
    improvement_low: float
    improvement_high: float
    se: float = 0.0
    df: float = math.inf


def stratified(differences: Sequence[Difference]) -> tuple[float, float, float]:
    """The mean of S per-setting differences, its standard error sqrt(sum se_i^2) / S and the
    Welch-Satterthwaite degrees of freedom (sum se_i^2)^2 / sum(se_i^4 / df_i); inf df when no setting has spread."""
    s = len(differences)
    mean = sum(d.mean for d in differences) / s
    variance = sum(d.se**2 for d in differences)
    denominator = sum(d.se**4 / d.df for d in differences if d.se > 0)
    return mean, math.sqrt(variance) / s, variance**2 / denominator if denominator > 0 else math.inf


def _improvement(a: np.ndarray, b: np.ndarray) -> float:
    greater = (a[:, None] > b[None, :]).mean()
    ties = (a[:, None] == b[None, :]).mean()
    return float(greater + ties / 2)


def aggregate(strata: Sequence[tuple[Mapping[int, float], Mapping[int, float]]], seed: int = 0) -> Aggregate:
    """Across settings: each stratum is one setting's (A, B) per-seed values. The mean difference's interval
    is :func:`stratified`'s t interval over each setting's :func:`compare`; the probability of improvement's is
    the bootstrap's 2.5-97.5 percentiles (paired strata resample seeds as pairs, the others each side alone)."""
    data = []
    for a, b in strata:
        seeds = sorted(set(a) & set(b))
        paired = len(seeds) >= 2
        va = steady([a[s] for s in seeds] if paired else list(a.values()))
        vb = steady([b[s] for s in seeds] if paired else list(b.values()))
        data.append((va, vb, paired))
    mean, se, df = stratified([compare(a, b) for a, b in strata])
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * se if se > 0 else 0.0
    improvement = float(np.mean([_improvement(va, vb) for va, vb, _ in data]))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        resampled = []
        for va, vb, paired in data:
            ia = rng.integers(0, len(va), len(va))
            ib = ia if paired else rng.integers(0, len(vb), len(vb))
            resampled.append(_improvement(va[ia], vb[ib]))
        draws.append(np.mean(resampled))
    low, high = np.percentile(np.array(draws), [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return Aggregate(len(data), mean, mean - half, mean + half, improvement, float(low), float(high), se, df)
