"""Reported against measured: each recipe's reported accuracy beside the mean of its runs, and a verdict that
needs evidence.

A measured mean reproduces a reported accuracy when the whole 95% Student t interval of measured minus
reported lies within the reported row's ``tolerance`` (points, stated in the recipe in advance; default
:data:`REPRODUCTION_TOLERANCE`). Where the interval lies wholly beyond the tolerance the mean is "below" or
"above"; anything else (one run, or an interval too wide to tell) is "not resolved", never a match for
want of evidence.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy.stats import t as t_dist

#: points either side of a reported accuracy within which a measured mean's whole 95% interval must lie
REPRODUCTION_TOLERANCE = 0.5
LEVEL = 0.95


def mean_interval(values: pd.Series) -> tuple[float, float]:
    """The 95% Student t interval of the mean of ``values`` (NaN, NaN for fewer than two)."""
    if len(values) < 2:
        return math.nan, math.nan
    half = float(t_dist.ppf(0.5 + LEVEL / 2, len(values) - 1)) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return float(values.mean()) - half, float(values.mean()) + half


def status(low: float, high: float, tolerance: float) -> str:
    """The verdict from the 95% interval [low, high] of measured minus reported (see the module docstring)."""
    if math.isnan(low) or math.isnan(high):
        return "not resolved"
    if -tolerance <= low and high <= tolerance:
        return "reproduced"
    return "below" if high < -tolerance else "above" if low > tolerance else "not resolved"


def _measured(values: pd.Series, failed: int, reported, tolerance: float) -> dict[str, object]:
    if values.empty:
        return {"measured acc (%)": "", "n": 0, "failed": failed, "difference [95% CI]": "", "status": "failed"}
    mean, std = values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0
    low, high = (v - reported.accuracy for v in mean_interval(values))
    interval = "" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]"
    return {
        "measured acc (%)": f"{mean:.2f} ± {std:.2f}",
        "n": len(values),
        "failed": failed,
        "difference [95% CI]": f"{mean - reported.accuracy:+.2f}{interval}",
        "status": status(low, high, tolerance),
    }


def reproduction_table(recipes, runs: pd.DataFrame | None, sets: list[str] = ()) -> pd.DataFrame:
    """Reported against measured, per (recipe, optimizer) with a reported number (completed or diverged runs
    of the recipe's configurations, with the ``key=value`` overrides ``sets``: ``data_dir=DIR`` among them,
    whose fingerprint is part of each run's id). ``n`` counts the finite accuracies behind the mean; ``failed``
    the runs that diverged or have no finite accuracy."""
    rows = []
    for recipe in recipes:
        configs = recipe.runs(sets, equal_passes=False)  # a reported number is at the paper's epochs
        for optimizer, reported in recipe.reported.items():
            ids = {c.run_id() for c in configs if c.optimizer == optimizer}
            mine = runs[runs.run_id.isin(ids) & runs.status.isin(["completed", "diverged"])] if runs is not None else []
            tolerance = getattr(reported, "tolerance", None) or REPRODUCTION_TOLERANCE
            row = {
                "recipe": recipe.name,
                "optimizer": optimizer,
                "reported acc (%)": reported.accuracy,
                "metric": reported.metric,
                "source": reported.source + (f" ({reported.note})" if getattr(reported, "note", None) else ""),
                "tolerance": f"±{tolerance:g}",
            }
            if len(mine) == 0:
                row.update({"measured acc (%)": "", "n": 0, "failed": 0, "difference [95% CI]": "", "status": "not run"})
                row["command"] = f"python launch.py sweep {recipe.name} --data_dir DIR"
            else:
                every = mine["best_test_acc" if reported.metric == "best" else "final_test_acc"].astype(float) * 100
                finite = every.map(math.isfinite)
                failed = int((~finite | (mine.status == "diverged")).sum())
                row.update(_measured(every[finite], failed, reported, tolerance))
                row["command"] = f"python launch.py sweep {recipe.name}"
            rows.append(row)
    return pd.DataFrame(rows)
