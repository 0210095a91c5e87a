"""Aggregate run directories into pandas tables (CSV + Markdown), from the run files only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .io import read_json

GROUP = ["dataset", "arch", "optimizer"]
SHARPNESS = {"hessian_max_eigenvalue": "λ_max", "sam_sharpness": "SAM sharpness", "hessian_trace": "Hessian trace"}


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (those holding summary.json) under the given paths."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("summary.json")))
    return found


def load_runs(paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for run in find_runs(paths):
        sharpness = read_json(run / "sharpness.json") if (run / "sharpness.json").is_file() else {}
        config = read_json(run / "config.json") if (run / "config.json").is_file() else {}
        rows.append({**read_json(run / "summary.json"), **sharpness, "label_noise": config.get("label_noise", 0.0),
                     "run_dir": str(run)})
    if not rows:
        raise FileNotFoundError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return pd.DataFrame(rows)


def _mean_std(values: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
    mean, std = values.mean() * scale, values.std(ddof=1) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def comparison_table(runs: pd.DataFrame, baseline: str = "sgd") -> pd.DataFrame:
    """One row per (dataset, arch, optimizer): accuracy mean ± std over seeds, n, cost relative to the baseline."""
    order = {name: i for i, name in enumerate(_optimizer_order())}
    rows = []
    for (dataset, arch, optimizer), runs_of in runs.groupby(GROUP, sort=False):
        base = runs[(runs.dataset == dataset) & (runs.arch == arch) & (runs.optimizer == baseline)]
        ratio = runs_of.train_time_s.mean() / base.train_time_s.mean() if len(base) else float("nan")
        rows.append(
            {
                "dataset": dataset,
                "arch": arch,
                "optimizer": optimizer,
                "n": len(runs_of),
                "final acc (%)": _mean_std(runs_of.final_test_acc, 100),
                "best acc (%)": _mean_std(runs_of.best_test_acc, 100),
                "final acc mean": runs_of.final_test_acc.mean() * 100,
                "final acc std": runs_of.final_test_acc.std(ddof=1) * 100 if len(runs_of) > 1 else 0.0,
                "test loss": round(runs_of.final_test_loss.mean(), 4),
                "ECE (%)": _mean_std(runs_of.final_test_ece, 100) if "final_test_ece" in runs_of else "",
                **{label: _mean_std(runs_of[key], digits=3) if key in runs_of and runs_of[key].notna().all() else ""
                   for key, label in SHARPNESS.items()},
                f"time vs {baseline}": round(ratio, 2),
                "passes/step": round(runs_of.passes_per_step.mean(), 2),
                "images/s": round(runs_of.images_per_s.mean(), 1),
                "stopped early": bool(runs_of.stopped_early.any()),
            }
        )
    table = pd.DataFrame(rows)
    table["_order"] = table.optimizer.map(lambda o: order.get(o, len(order)))
    return table.sort_values(["dataset", "arch", "_order"]).drop(columns="_order").reset_index(drop=True)


def reproduction_table(recipes, runs: pd.DataFrame | None) -> pd.DataFrame:
    """Reported against measured, per (recipe, optimizer) with a reported number."""
    rows = []
    for recipe in recipes:
        for optimizer, reported in recipe.reported.items():
            ids = {c.run_id() for c in recipe.runs() if c.optimizer == optimizer}
            mine = runs[runs.run_id.isin(ids) & (runs.status != "stopped_early")] if runs is not None else []
            row = {"recipe": recipe.name, "optimizer": optimizer, "reported acc (%)": reported.accuracy,
                   "metric": reported.metric, "source": reported.source}
            if len(mine) == 0:
                row.update({"measured acc (%)": "", "n": 0, "difference": "", "status": "not run",
                            "command": f"python launch.py sweep {recipe.name} --data_dir DIR"})
            else:
                values = mine["best_test_acc" if reported.metric == "best" else "final_test_acc"] * 100
                mean, std = values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0
                diff = mean - reported.accuracy
                tolerance = max(reported.spread or 0.0, std)
                verdict = "within" if abs(diff) <= tolerance else "below" if diff < 0 else "above"
                row.update({"measured acc (%)": f"{mean:.2f} ± {std:.2f}", "n": len(values), "difference": f"{diff:+.2f}",
                            "status": verdict, "command": f"python launch.py sweep {recipe.name}"})
            rows.append(row)
    return pd.DataFrame(rows)


def frame_to_markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *lines]) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["final acc mean", "final acc std"], errors="ignore")
    escape = lambda v: str(v).replace("_", "\\_").replace("%", "\\%").replace("±", "$\\pm$")  # noqa: E731
    lines = ["\\begin{tabular}{" + "l" * len(shown.columns) + "}", "\\hline",
             " & ".join(escape(c) for c in shown.columns) + " \\\\", "\\hline"]
    lines += [" & ".join(escape(v) for v in row) + " \\\\" for row in shown.itertuples(index=False)]
    return "\n".join(lines + ["\\hline", "\\end{tabular}"]) + "\n"


def _optimizer_order() -> list[str]:
    from optimizers import available_optimizers

    return available_optimizers()


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["final acc mean", "final acc std"])
    return frame_to_markdown(shown.loc[:, [c for c in shown.columns if (shown[c] != "").any()]])


def write_comparison(paths: list[str | Path], out_prefix: str | Path, preamble: str = "") -> pd.DataFrame:
    from .io import write_text

    table = comparison_table(load_runs(paths))
    out_prefix = Path(out_prefix)
    write_text(out_prefix.with_suffix(".csv"), table.to_csv(index=False))
    write_text(out_prefix.with_suffix(".md"), preamble + to_markdown(table))
    write_text(out_prefix.with_suffix(".tex"), to_latex(table))
    return table


def print_table(table: pd.DataFrame, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    columns = ["dataset", "arch", "optimizer", "n", "final acc (%)", "best acc (%)", "time vs sgd", "passes/step"]
    rich_table = Table(title=title)
    for column in columns:
        rich_table.add_column(column, no_wrap=True)
    for row in table[columns].itertuples(index=False):
        rich_table.add_row(*map(str, row))
    Console().print(rich_table)
