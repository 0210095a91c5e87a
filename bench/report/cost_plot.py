"""Accuracy against measured cost, one point per table row, with intervals on both axes and the Pareto front.

Drawn from a comparison table (``bench.report.tables.comparison_table``) alone, so it is the same from
run folders or from a per-run file: y is the final test accuracy's mean with its 95% Student t interval
over seeds, x the step time relative to SGD with about two of its standard errors (``time ± (%)``). A
row whose ratio the table marks ``imprecise`` is drawn hollow. The front joins the rows that no other
row beats on both axes (as cheap or cheaper and as accurate or more, one of them strictly).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from bench.io import atomic_path  # noqa: E402


def _points(table: pd.DataFrame) -> pd.DataFrame:
    rows = table[table.get("status", pd.Series("completed", index=table.index)) == "completed"]
    time = pd.to_numeric(rows["time vs sgd"], errors="coerce")
    rows = rows.assign(time=time)[time.notna() & rows["final acc mean"].notna()]
    if rows.empty:
        return rows
    error = pd.to_numeric(rows.get("time ± (%)", pd.Series("", index=rows.index)), errors="coerce").fillna(0.0)
    half = [stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else 0.0 for n, std in zip(rows["n"], rows["final acc std"])]
    label = rows.optimizer + rows.get("settings", pd.Series("", index=rows.index)).map(lambda s: f" ({s})" if s else "")
    return rows.assign(acc=rows["final acc mean"], acc_half=half, time_half=2 * error / 100 * rows.time, label=label)


def pareto(points: pd.DataFrame) -> list[int]:
    """Positions (in ``points``) of the rows no other row dominates, ordered by cost."""
    front = []
    values = list(zip(points.time, points.acc))
    for i, (t, a) in enumerate(values):
        dominated = any(t2 <= t and a2 >= a and (t2 < t or a2 > a) for j, (t2, a2) in enumerate(values) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: values[i][0])


def plot_accuracy_vs_cost(table: pd.DataFrame, path: str | Path, title: str = "") -> Path | None:
    """Write the figure; None when no row has both a time ratio and an accuracy."""
    points = _points(table)
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    imprecise = points.get("imprecise", pd.Series("", index=points.index)) == "yes"
    for (_, row), hollow in zip(points.iterrows(), imprecise):
        ax.errorbar(
            row.time,
            row.acc,
            xerr=row.time_half,
            yerr=row.acc_half,
            fmt="o",
            mfc="white" if hollow else "tab:blue",
            mec="tab:blue",
            ecolor="tab:blue",
            alpha=0.8,
            capsize=2,
        )
        ax.annotate(row.label, (row.time, row.acc), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = points.iloc[pareto(points)]
    ax.plot(front.time, front.acc, color="tab:red", linewidth=1.2, drawstyle="steps-post", label="Pareto front")
    ax.set_xlabel("step time relative to SGD (± 2 se; hollow: imprecise)")
    ax.set_ylabel("final test accuracy (%), 95% interval over seeds")
    ax.set_title(title or "accuracy against measured cost")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
