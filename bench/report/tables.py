"""Aggregate run directories into pandas tables (CSV + Markdown + LaTeX), from the run files only.

A run directory is one holding ``config.json`` (written when the run starts); ``summary.json`` is written
when it ends, with status "completed", "stopped_early" or "diverged".  A run without it is "unfinished".

One table row per (settings, status): the settings are config.json less the fields that do not change a
result (``bench.config.OPERATIONAL``) and the per-run fields (``PER_RUN``: seed, run_id, ...), so the
seeds of one configuration are averaged and nothing else is.  Columns, for the common case as before
(dataset, arch, optimizer, n, accuracies as mean ± sample std over seeds, ...), plus three that appear
only when needed:

* ``settings``: only when two rows share (dataset, arch, optimizer); then every row lists its values of
  the fields that differ within such a block (``max_steps=11``, ``rho=0.1``; a hyperparameter a run
  left to the variant's default shows as ``rho=default``);
* ``status``: only when some row is not "completed".  Unfinished rows count their runs (n) and leave
  the accuracies blank;
* ``contended``: only when some run was timed while other work shared its machine (its summary says
  ``"contended": true``, or its recorded loads do by ``bench.environment.contended``): per row, how
  many of its runs ("1/3"); their times are inflated.
* ``tuned``: only when the caller passes ``tuned`` (optimizer -> the values tuning chose, as
  ``bench.studies.tune`` does): that text on the optimizer's rows (``rho=0.05``), blank on the others.

``time vs sgd`` compares a completed row's step time (``_step_times``) with that of the COMPLETED sgd runs of
the same budget: the same settings except the optimizer's own (``OPTIMIZER_OWN``) and its step settings
(``STEP_SETTINGS``: lr, momentum, ...), preferring sgd runs whose step settings match too, and run with
the same torch thread count and process count as every run of the row, from the runs not flagged
``contended`` on both sides, else from runs that shared the machine with other work on both sides
(the row's ``contended`` column then flags the ratio); never a quiet run against a contended one, and
never a run on an oversubscribed machine.  No such pair, or a row that did not complete: blank.
``time ± (%)``, shown when some ratio has two runs or more on each side, is the ratio's relative
standard error from the seeds' spread of step times; ``imprecise`` (shown when some row has it) marks a
ratio whose two standard errors exceed 15% (``PRECISION``), or whose runs trained for less than
``MIN_TIMED_S`` each: runs too unevenly timed, or too short, to pin a step cost that closely
(``python launch.py perf --recipe NAME`` times the same step quietly).

Problems: a missing path, a path that is not a folder, or a folder without any run raise ``ResultsError``
(one line).  A run whose config.json or summary.json is malformed is skipped and named in a note
(``read_runs`` returns them; ``load_runs`` also emits each as a ``RunSkipped`` warning); when every run
is skipped, ``ResultsError`` names the files.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from rich.console import Console
from rich.table import Table

from bench.io import write_text
from bench.report import records
from bench.report.overwrite import check_runs_kept
from bench.report.runs import GROUP, SHARPNESS, STATUSES, is_number, load_runs, optimizer_order, settings_key

#: settings that only the optimizer reads: a baseline for "time vs sgd" may differ in these
OPTIMIZER_OWN = ("optimizer", "base_optimizer", "hyperparameters")
STEP_SETTINGS = ("lr", "momentum", "weight_decay", "nesterov")
_DEFAULT = object()  # a hyperparameter a run does not set (the variant's default)
#: the relative error within which a time ratio is trusted: two standard errors (about 95%) must fit
PRECISION = 0.15
#: the training time below which a run's step time is not trusted to PRECISION, whatever its seeds'
#: spread: a slow spell of a shared machine outlasts such a run and can slow two of three seeds alike
#: (three sweeps of the 1-5 s digits runs put ratios 20-40% off with standard errors of 5-8%; runs of a
#: minute or more stayed within 18% even beside another run)
MIN_TIMED_S = 30.0


def _mean_std(values: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
    """ "mean ± sample std" (ddof=1; ± 0 for one value); blank when a value is missing or not finite."""
    if len(values) == 0 or not all(math.isfinite(v) for v in values):
        return ""
    mean, std = values.mean() * scale, values.std(ddof=1) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _rounded(value: float, digits: int) -> float | str:
    return round(float(value), digits) if math.isfinite(value) else ""


def _time_ratio(runs_of: pd.DataFrame, runs: pd.DataFrame, baseline: str) -> tuple[float | str, float | str]:
    """Step cost over that of the completed ``baseline`` runs of the same budget, and that ratio's
    relative standard error in % from the seeds' spread of step times on both sides; blank if none
    (the error also when a side has one run)."""
    if runs_of.status.iloc[0] != "completed":
        return "", ""
    identity = runs_of.identity.iloc[0]
    budget, step = settings_key(identity, OPTIMIZER_OWN + STEP_SETTINGS), [identity.get(k) for k in STEP_SETTINGS]
    base = runs[(runs.optimizer == baseline) & (runs.status == "completed")]
    base = base.loc[[settings_key(i, OPTIMIZER_OWN + STEP_SETTINGS) == budget for i in base.identity]]
    same_step = base.loc[[[i.get(k) for k in STEP_SETTINGS] == step for i in base.identity]]
    base = same_step if len(same_step) else base  # a variant with its own lr (bSAM) still gets a ratio
    # step times compare only at the same thread count and process count (operational settings, so
    # not part of a run's identity): a row whose runs differ there gets no ratio
    timing = set(runs_of.timing)
    base = base[base.timing == next(iter(timing))] if len(timing) == 1 else base.iloc[:0]
    # a step time taken while other work shared the machine is inflated: quiet runs on both sides, else
    # runs beside another on both sides (the row's contended column flags it), never one against the
    # other, and never a run on an oversubscribed machine (inflated by an unknown factor)
    runs_of, base = runs_of[~runs_of.oversubscribed.astype(bool)], base[~base.oversubscribed.astype(bool)]
    for busy in (False, True):
        mine, theirs = runs_of[runs_of.contended.astype(bool) == busy], base[base.contended.astype(bool) == busy]
        if len(mine) and len(theirs):
            a, b = _step_times(mine, theirs)
            error = math.hypot(_relative_se(a), _relative_se(b)) * 100
            return _rounded(a.median() / b.median(), 2), _rounded(error, 1)
    return "", ""


def _step_times(*sides: pd.DataFrame) -> list[pd.Series]:
    """Each run's step time: the median over epochs of the epoch's mean step, which counts every kind
    of step (LookSAM's ascent every k-th one, which a median step would miss) and confines a burst of
    other work to its epoch.  When a run on any side was written before that was recorded, every side
    gives its training time instead: one measure for all, never a step time against a training time."""
    recorded = all("step_time_s" in runs and runs.step_time_s.notna().all() for runs in sides)
    return [(runs.step_time_s if recorded else runs.train_time_s).astype(float) for runs in sides]


def _relative_se(times: pd.Series) -> float:
    """The standard error of the mean over the mean (NaN for one run): how well the runs pin a time."""
    return times.std(ddof=1) / times.mean() / math.sqrt(len(times)) if len(times) > 1 else math.nan


def _imprecise(error: float | str, runs_of: pd.DataFrame) -> bool:
    """Whether a ratio cannot be trusted to PRECISION: two standard errors beyond it, or runs too short."""
    return (error != "" and 2 * error > PRECISION * 100) or runs_of.train_time_s.median() < MIN_TIMED_S


def _group_row(runs_of: pd.DataFrame, runs: pd.DataFrame, baseline: str) -> dict[str, Any]:
    first = runs_of.iloc[0]
    acc = runs_of.final_test_acc
    ratio, error = _time_ratio(runs_of, runs, baseline)
    return {
        "dataset": first.dataset,
        "arch": first.arch,
        "optimizer": first.optimizer,
        "settings": "",
        "status": first.status,
        "n": len(runs_of),
        "final acc (%)": _mean_std(acc, 100),
        "best acc (%)": _mean_std(runs_of.best_test_acc, 100),
        "final acc mean": acc.mean(skipna=False) * 100,
        "final acc std": acc.std(ddof=1, skipna=False) * 100 if len(runs_of) > 1 else (0.0 if acc.notna().all() else math.nan),
        "test loss": _rounded(runs_of.final_test_loss.mean(skipna=False), 4),
        "ECE (%)": _mean_std(runs_of.final_test_ece, 100),
        **{label: _mean_std(runs_of[key], digits=3) if key in runs_of else "" for key, label in SHARPNESS.items()},
        f"time vs {baseline}": ratio,
        "time ± (%)": error,
        # the baseline's own row is 1 by definition, however its runs were timed
        "imprecise": "yes" if ratio != "" and first.optimizer != baseline and _imprecise(error, runs_of) else "",
        "passes/step": _rounded(runs_of.passes_per_step.mean(skipna=False), 2),
        "images/s": _rounded(runs_of.images_per_s.mean(skipna=False), 1),
        "contended": f"{int(runs_of.contended.sum())}/{len(runs_of)}" if runs_of.contended.any() else "",
        "stopped early": first.status == "stopped_early",
    }


def _flat(identity: dict) -> dict[str, Any]:
    """The settings as one level (hyperparameters by their own name), without the table's own columns."""
    flat = {k: v for k, v in identity.items() if k not in GROUP and k != "hyperparameters"}
    for name, value in identity.get("hyperparameters", {}).items():
        flat[name if name not in flat else f"hyperparameters.{name}"] = value
    return flat


def _show(value: Any) -> str:
    if value is _DEFAULT:
        return "default"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _sortable(value: Any) -> tuple:
    return (0, float(value), "") if is_number(value) else (1, 0.0, _show(value))


def _settings(groups: list[pd.DataFrame]) -> tuple[list[str], list[tuple]]:
    """Per group, "k=v, ..." for the fields that differ within some (dataset, arch, optimizer) block, and a sort key.

    A differing config field is shown on every row (max_steps=11 against max_steps=44 everywhere); a
    differing hyperparameter only on the rows of the blocks where it differs (no rho on sgd rows)."""
    flats = [_flat(g.identity.iloc[0]) for g in groups]
    blocks: dict[tuple, list[int]] = {}
    for i, group in enumerate(groups):
        blocks.setdefault(tuple(group[GROUP].iloc[0]), []).append(i)
    fields: dict[str, None] = {}
    own: list[dict[str, None]] = [{} for _ in groups]
    for members in blocks.values():
        for key in sorted(set().union(*(flats[i] for i in members))):
            if len({_show(flats[i].get(key, _DEFAULT)) for i in members}) < 2:
                continue
            if key in groups[members[0]].identity.iloc[0]:  # a config field, not a hyperparameter
                fields[key] = None
            else:
                for i in members:
                    own[i][key] = None
    keys = [[*fields, *mine] for mine in own]
    labels = [", ".join(f"{k}={_show(f.get(k, _DEFAULT))}" for k in ks) for f, ks in zip(flats, keys)]
    return labels, [tuple(_sortable(f.get(k, _DEFAULT)) for k in ks) for f, ks in zip(flats, keys)]


def comparison_table(runs: pd.DataFrame, baseline: str = "sgd", tuned: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per (settings, status): accuracy mean ± sample std over seeds, n, cost relative to the baseline.

    Rows are ordered by dataset, arch, ``optimizer_order()``, settings, then status; the ``settings`` and
    ``status`` columns are left out when they would not tell rows apart (see the module docstring).
    ``tuned`` (optimizer -> text) adds a ``tuned`` column after ``optimizer``."""
    groups = [g for _, g in runs.groupby(["settings_key", "status"], sort=False)]
    labels, sort_keys = _settings(groups)
    rank = {name: i for i, name in enumerate(optimizer_order(runs.optimizer))}
    rows = []
    for group, label, sort_key in zip(groups, labels, sort_keys):
        row = {**_group_row(group, runs, baseline), "settings": label}
        order = (row["dataset"], row["arch"], rank[row["optimizer"]], sort_key, STATUSES.index(row["status"]))
        rows.append((order, row))
    table = pd.DataFrame([row for _, row in sorted(rows, key=lambda pair: pair[0])])
    needed = {
        "settings": any(labels),
        "status": (table.status != "completed").any(),
        "contended": (table.contended != "").any(),
        "time ± (%)": (table["time ± (%)"] != "").any(),
        "imprecise": (table.imprecise != "").any(),
    }
    unused = [column for column, keep in needed.items() if not keep]
    if tuned is not None:
        table.insert(table.columns.get_loc("optimizer") + 1, "tuned", [tuned.get(name, "") for name in table.optimizer])
    return table.drop(columns=unused).reset_index(drop=True)


# ----------------------------------------------------------------------------- output


def frame_to_markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *lines]) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["final acc mean", "final acc std"], errors="ignore")
    escape = lambda v: str(v).replace("_", "\\_").replace("%", "\\%").replace("±", "$\\pm$")  # noqa: E731
    lines = [
        "\\begin{tabular}{" + "l" * len(shown.columns) + "}",
        "\\hline",
        " & ".join(escape(c) for c in shown.columns) + " \\\\",
        "\\hline",
    ]
    lines += [" & ".join(escape(v) for v in row) + " \\\\" for row in shown.itertuples(index=False)]
    return "\n".join(lines + ["\\hline", "\\end{tabular}"]) + "\n"


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["final acc mean", "final acc std"])
    return frame_to_markdown(shown.loc[:, [c for c in shown.columns if (shown[c] != "").any()]])


def code_note(runs: list[dict[str, Any]]) -> str:
    """One line when the runs were made by several commits of the code, or from a modified tree; else nothing."""
    commits = Counter((run.get("commit") or "unrecorded")[:7] for run in runs)
    dirty = sum(run.get("dirty") is True for run in runs)
    parts = []
    if len(commits) > 1:
        parts.append(
            f"these runs span {len(commits)} commits of the code ({', '.join(f'{c}: {n}' for c, n in commits.items())} runs)"
        )
    if dirty:
        parts.append(f"{dirty} of {len(runs)} runs ran from a tree with uncommitted changes")
    return f"Note: {'; '.join(parts)}.\n\n" if parts else ""


def write_comparison(
    runs: list[str | Path] | pd.DataFrame,
    out_prefix: str | Path,
    preamble: str = "",
    tuned: Mapping[str, str] | None = None,
    force: bool = False,
) -> pd.DataFrame:
    """Write ``{out_prefix}.csv/.md/.tex`` and ``{out_prefix}_acc_cost.png`` for the runs (folders, per-run files, or a frame of
    ``bench.report.runs.runs_frame``) and the per-run file ``{out_prefix}_runs.csv`` (from which the
    same command regenerates the table without the run folders); the table's ``.attrs["notes"]`` holds
    the skipped-run notes. An existing per-run file listing a finished run that these runs leave out is
    refused (:class:`~bench.report.overwrite.WouldShrink`) unless ``force``."""
    runs = runs if isinstance(runs, pd.DataFrame) else load_runs(runs)
    out_prefix = Path(out_prefix)
    check_runs_kept(out_prefix, [r["run_id"] for r in runs.attrs["records"]], force)
    table = comparison_table(runs, tuned=tuned)
    table.attrs["notes"] = runs.attrs.get("notes", [])
    write_text(records.path_for(out_prefix), records.to_csv(runs.attrs["records"]))
    write_text(out_prefix.with_suffix(".csv"), table.to_csv(index=False))
    write_text(out_prefix.with_suffix(".md"), preamble + code_note(runs.attrs["records"]) + to_markdown(table))
    write_text(out_prefix.with_suffix(".tex"), to_latex(table))
    from bench.report.cost_plot import plot_accuracy_vs_cost  # matplotlib only where a table is written

    plot_accuracy_vs_cost(table, f"{out_prefix}_acc_cost.png", title=f"{out_prefix.name}: accuracy against measured cost")
    return table


def print_table(table: pd.DataFrame, title: str = "") -> None:
    columns = [
        "dataset",
        "arch",
        "optimizer",
        "tuned",
        "settings",
        "status",
        "n",
        "final acc (%)",
        "best acc (%)",
        "time vs sgd",
        "time ± (%)",
        "imprecise",
        "contended",
        "passes/step",
    ]
    columns = [c for c in columns if c in table]
    rich_table = Table(title=title)
    for column in columns:
        rich_table.add_column(column, no_wrap=True, min_width=min(len(column), 8))
    for row in table[columns].itertuples(index=False):
        rich_table.add_row(*map(str, row))
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(rich_table)  # a pipe or a log: do not cut columns
