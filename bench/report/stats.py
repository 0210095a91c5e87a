"""Interval estimates for comparing two optimizers over seeds, and their correction for many tests.

- :func:`compare`: the mean difference A - B with a 95% Student t interval. Paired (per-seed
  differences, n - 1 degrees of freedom) when both sides ran exactly the same seeds, which in this
  harness share the initialisation, the data order, the augmentation and the label-noise draw;
  otherwise Welch's unpaired interval (Welch-Satterthwaite degrees of freedom).
- :meth:`Difference.p_value`: the two-sided p-value of "the difference is ``null``" (0 for "A beats
  B", minus a margin for "A is not worse than B by more than the margin").
- :func:`holm`: Holm's step-down adjustment of a family of p-values (the claims of one table).
- :func:`ratio`: a cost ratio A / B with its interval, on the log scale.
- :func:`aggregate`: across settings, in the manner of rliable (Agarwal et al., NeurIPS'21): the mean
  of the per-setting mean differences and the probability of improvement, each with a stratified
  bootstrap 95% interval (seeds resampled within each setting).
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


@dataclass(frozen=True)
class Difference:
    """A - B over seeds: the mean, its standard error, degrees of freedom, and the 95% interval."""

    mean: float
    se: float
    df: float
    n_a: int
    n_b: int
    paired: bool

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


def compare(a: Mapping[int, float], b: Mapping[int, float]) -> Difference:
    """A - B from per-seed values (seed -> value): paired on the seeds both sides ran when there are two
    or more (a seed only one side ran is left out), else Welch's on all of them.

    ValueError when a side has fewer than two values (no spread, no interval)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"an interval needs two runs or more per side (got {len(a)} and {len(b)})")
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:  # a seed only one side ran has no partner: left out
        d = np.array([a[s] - b[s] for s in shared], dtype=float)
        return Difference(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1.0, len(d), len(d), True)
    va, vb = np.array(list(a.values()), dtype=float), np.array(list(b.values()), dtype=float)
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
    """One claim across settings: the mean of the per-setting mean differences and the probability
    that a run of A beats a run of B in the same setting (ties count half), each with its interval."""

    settings: int
    mean: float
    mean_low: float
    mean_high: float
    improvement: float
    improvement_low: float
    improvement_high: float


def _improvement(a: np.ndarray, b: np.ndarray) -> float:
    greater = (a[:, None] > b[None, :]).mean()
    ties = (a[:, None] == b[None, :]).mean()
    return float(greater + ties / 2)


def _statistics(strata: list[tuple[np.ndarray, np.ndarray, bool]]) -> tuple[float, float]:
    means = [float((a - b).mean()) if paired else float(a.mean() - b.mean()) for a, b, paired in strata]
    improvements = [_improvement(a, b) for a, b, _ in strata]
    return float(np.mean(means)), float(np.mean(improvements))


def aggregate(strata: Sequence[tuple[Mapping[int, float], Mapping[int, float]]], seed: int = 0) -> Aggregate:
    """Across settings: each stratum is one setting's (A, B) per-seed values. Paired strata resample
    seeds as pairs, the others each side on its own; the interval is the bootstrap's 2.5-97.5 percentiles."""
    data = []
    for a, b in strata:
        seeds = sorted(set(a) & set(b))
        paired = len(seeds) >= 2
        va = np.array([a[s] for s in seeds] if paired else list(a.values()), dtype=float)
        vb = np.array([b[s] for s in seeds] if paired else list(b.values()), dtype=float)
        data.append((va, vb, paired))
    mean, improvement = _statistics(data)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        resampled = []
        for va, vb, paired in data:
            ia = rng.integers(0, len(va), len(va))
            ib = ia if paired else rng.integers(0, len(vb), len(vb))
            resampled.append((va[ia], vb[ib], paired))
        draws.append(_statistics(resampled))
    low, high = np.percentile(np.array(draws), [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2], axis=0)
    return Aggregate(len(data), mean, float(low[0]), float(high[0]), improvement, float(low[1]), float(high[1]))
