"""Figures from run directories: test accuracy against epoch, training time and sharpness, and per optimizer.

Reads only the run files (``config.json``, ``metrics.jsonl``, ``summary.json``, ``sharpness.json``), so
it works on copied or finished runs without torch.  Figures are PNG (Agg backend, no display needed),
~7 x 4.5 in at 120 dpi, written atomically (temporary ``.png`` in the same folder, then ``os.replace``).

Several (dataset, arch) pairs are never mixed in one figure: ``write_plots`` writes one set of figures per
pair, and when the runs span more than one pair the pair goes into the file name as a suffix,
``{out_prefix}_acc_epoch_{dataset}_{arch}.png`` (with a single pair the names are the plain
``{out_prefix}_acc_epoch.png`` etc.).  The individual ``plot_*`` functions refuse (ValueError) input that
spans several pairs.

Curves average over seeds epoch by epoch; a run that stopped early simply contributes to fewer epochs.
If the runs of one pair use several label-noise levels, each (optimizer, noise) is its own series.
Series follow ``bench.report.tables.optimizer_order`` (the tables' order).  A malformed run file (truncated
JSON, say) is ignored with a ``RunSkipped`` warning naming it.

    python -m bench.report.plots runs/cifar10_cpu --out results/cifar10_cpu
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.io import (
    atomic_path,  # noqa: E402
    read_json,  # noqa: E402
    read_jsonl,  # noqa: E402
)
from bench.report.runs import (
    RunSkipped,  # noqa: E402  (one optimizer order for tables and legends)
    find_runs,  # noqa: E402  (one optimizer order for tables and legends)
    optimizer_order,  # noqa: E402  (one optimizer order for tables and legends)
)

CURVE_COLUMNS = ["run_dir", "dataset", "arch", "optimizer", "seed", "label_noise", "epoch", "test_acc", "elapsed_s"]
FIGSIZE = (7, 4.5)
DPI = 120
MEASURE_LABELS = {
    "hessian_max_eigenvalue": "Hessian max eigenvalue λ_max",
    "hessian_trace": "Hessian trace",
    "sam_sharpness": "SAM sharpness (loss increase at ρ)",
    "loss": "Training loss at the sharpness probe",
}


# ----------------------------------------------------------------------------- reading runs


def _read_json_or_empty(path: Path) -> dict:
    """The JSON object in ``path``; {} when the file is missing, and {} with a RunSkipped warning when it
    is not a JSON object (truncated, say): a malformed file leaves a run out of a figure, never stops it."""
    if not path.is_file():
        return {}
    try:
        value = read_json(path)
    except (OSError, ValueError) as err:
        value = f"unreadable ({err})"
    if not isinstance(value, dict):
        problem = value if isinstance(value, str) else f"not a JSON object ({type(value).__name__})"
        warnings.warn(f"{path}: {problem}; file ignored by the figures", RunSkipped, stacklevel=2)
        return {}
    return value


def _read_metrics(path: Path) -> list[dict]:
    """The epoch records of metrics.jsonl; [] (with a RunSkipped warning) when the file is malformed."""
    try:
        return [r for r in read_jsonl(path) if isinstance(r, dict) and "epoch" in r]
    except (OSError, ValueError) as err:
        warnings.warn(f"{path}: unreadable ({err}); file ignored by the figures", RunSkipped, stacklevel=2)
        return []


def _run_meta(run: Path) -> dict:
    """dataset/arch/optimizer/seed/label_noise of a run: config.json, completed by summary.json."""
    config, summary = _read_json_or_empty(run / "config.json"), _read_json_or_empty(run / "summary.json")
    meta = {}
    for key, default in [("dataset", "?"), ("arch", "?"), ("optimizer", "?"), ("seed", None), ("label_noise", 0.0)]:
        value = config.get(key, summary.get(key))
        meta[key] = default if value is None else value
    meta["label_noise"] = float(meta["label_noise"] or 0.0)
    return meta


def load_curves(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per (run, epoch) with the run's settings, test accuracy and cumulative epoch time.

    Runs without metrics.jsonl (or with no epoch in it) contribute no rows.  ``elapsed_s`` is the cumulative
    sum of ``epoch_time_s`` (a missing epoch time counts as 0); a duplicated epoch keeps its last record.
    """
    frames = []
    for run in map(Path, run_dirs):
        metrics_path = run / "metrics.jsonl"
        if not metrics_path.is_file():
            continue
        rows = _read_metrics(metrics_path)
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        for column in ("test_acc", "epoch_time_s"):
            if column not in frame:
                frame[column] = np.nan
        frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch", kind="stable")
        frame["elapsed_s"] = pd.to_numeric(frame["epoch_time_s"], errors="coerce").fillna(0.0).cumsum()
        frame["test_acc"] = pd.to_numeric(frame["test_acc"], errors="coerce")
        frame = frame[frame["test_acc"].notna()]  # epochs without a test evaluation (--test_every_epochs)
        for key, value in {"run_dir": str(run), **_run_meta(run)}.items():
            frame[key] = value
        frames.append(frame[CURVE_COLUMNS])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in CURVE_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _load_sharpness(run_dirs: Iterable[str | Path], measure: str) -> pd.DataFrame:
    """One row per run with sharpness.json holding a finite ``measure`` and a final test accuracy."""
    rows = []
    for run in map(Path, run_dirs):
        if not (run / "sharpness.json").is_file():
            continue
        sharpness, summary = _read_json_or_empty(run / "sharpness.json"), _read_json_or_empty(run / "summary.json")
        value, acc = sharpness.get(measure), summary.get("final_test_acc")
        if acc is None:  # no summary (unfinished run): fall back to the last epoch's accuracy
            metrics = _read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
            acc = metrics[-1].get("test_acc") if metrics else None
        if not (_finite(value) and _finite(acc)):
            continue
        rows.append({"run_dir": str(run), **_run_meta(run), "measure": float(value), "final_test_acc": float(acc)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- helpers


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _single_pair(frame: pd.DataFrame, what: str) -> tuple[str, str]:
    pairs = list(dict.fromkeys(zip(frame["dataset"], frame["arch"])))
    if len(pairs) != 1:
        raise ValueError(
            f"{what}: expected runs of one (dataset, arch) pair, got {pairs}; "
            "split them (write_plots does) instead of mixing them in one figure"
        )
    return pairs[0]


def _series(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per optimizer, or per (optimizer, label noise) when the noise level varies."""
    several_noises = frame["label_noise"].nunique() > 1
    out = []
    for optimizer in optimizer_order(frame["optimizer"]):
        rows = frame[frame["optimizer"] == optimizer]
        for noise in sorted(rows["label_noise"].unique()) if several_noises else [None]:
            part = rows if noise is None else rows[rows["label_noise"] == noise]
            out.append((optimizer if noise is None else f"{optimizer} (noise {noise:g})", part))
    return out


def _colors(labels: list[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _save(fig, path: str | Path) -> Path:
    """Write the figure atomically (see :func:`bench.io.atomic_path`) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= 6:
        ax.legend(loc="best", fontsize="small", framealpha=0.8)
    else:  # many series: put the legend beside the axes
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _plot_curves(curves: pd.DataFrame, path: str | Path, x: str) -> Path:
    if curves.empty:
        raise ValueError("no curves to plot (no run with metrics.jsonl)")
    dataset, arch = _single_pair(curves, "plot")
    series = _series(curves)
    colors = _colors([label for label, _ in series])
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for label, rows in series:
        stats = (
            rows.groupby("epoch")
            .agg(acc_mean=("test_acc", "mean"), acc_std=("test_acc", "std"), time_mean=("elapsed_s", "mean"))
            .sort_index()
        )
        xs = stats.index.to_numpy(dtype=float) if x == "epoch" else stats["time_mean"].to_numpy(dtype=float)
        mean = stats["acc_mean"].to_numpy(dtype=float) * 100
        std = stats["acc_std"].fillna(0.0).to_numpy(dtype=float) * 100  # one seed: no band
        n_seeds = rows["run_dir"].nunique()
        (line,) = ax.plot(
            xs, mean, color=colors[label], lw=1.6, marker="o" if len(xs) <= 30 else None, ms=3, label=f"{label} (n={n_seeds})"
        )
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    what = "epoch" if x == "epoch" else "training time"
    ax.set_title(f"{dataset} / {arch}: test accuracy vs {what} (mean ± std over seeds)")
    ax.set_xlabel("Epoch" if x == "epoch" else "Cumulative training time, mean over seeds (s)")
    ax.set_ylabel("Test accuracy (%)")
    if x == "epoch":
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return _save(fig, path)


# ----------------------------------------------------------------------------- public API


def plot_accuracy_vs_epoch(curves: pd.DataFrame, path: str | Path) -> Path:
    """One line per optimizer: mean test accuracy (%) over seeds per epoch, shaded ± std band."""
    return _plot_curves(curves, path, x="epoch")


def plot_accuracy_vs_time(curves: pd.DataFrame, path: str | Path) -> Path:
    """As plot_accuracy_vs_epoch, against the mean cumulative training time (s) at each epoch."""
    return _plot_curves(curves, path, x="elapsed_s")


def plot_accuracy_vs_sharpness(
    run_dirs: Iterable[str | Path], path: str | Path, measure: str = "hessian_max_eigenvalue"
) -> Path | None:
    """Scatter of final test accuracy (%) against ``measure`` from sharpness.json, one point per run,
    colour per optimizer.  Returns None and writes nothing when no run has that measure."""
    points = _load_sharpness(run_dirs, measure)
    if points.empty:
        return None
    dataset, arch = _single_pair(points, "plot_accuracy_vs_sharpness")
    series = _series(points)
    colors = _colors([label for label, _ in series])
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for label, rows in series:
        ax.scatter(
            rows["measure"],
            rows["final_test_acc"] * 100,
            color=colors[label],
            s=36,
            alpha=0.85,
            edgecolors="black",
            linewidths=0.4,
            label=f"{label} (n={len(rows)})",
        )
    values = points["measure"].to_numpy(dtype=float)
    if (values > 0).all() and values.max() / values.min() > 100:
        ax.set_xscale("log")
    measure_label = MEASURE_LABELS.get(measure, measure.replace("_", " "))
    ax.set_title(f"{dataset} / {arch}: final test accuracy vs {measure_label.split(' (')[0]}")
    ax.set_xlabel(f"{measure_label} (unitless, loss scale)")
    ax.set_ylabel("Final test accuracy (%)")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _load_finals(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per finished run with a final test accuracy (summary.json)."""
    rows = []
    for run in map(Path, run_dirs):
        acc = _read_json_or_empty(run / "summary.json").get("final_test_acc") if (run / "summary.json").is_file() else None
        if _finite(acc):
            rows.append({"run_dir": str(run), **_run_meta(run), "final_test_acc": float(acc)})
    return pd.DataFrame(rows)


def plot_final_accuracy(run_dirs: Iterable[str | Path], path: str | Path) -> Path | None:
    """Final test accuracy (%) per optimizer: each seed a dot, the mean a bar with +-1 std, SGD's mean a
    dashed line. Returns None and writes nothing when no run has finished."""
    finals = _load_finals(run_dirs)
    if finals.empty:
        return None
    dataset, arch = _single_pair(finals, "plot_final_accuracy")
    series = _series(finals)
    colors = _colors([label for label, _ in series])
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], max(2.5, 0.38 * len(series) + 1.2)), dpi=DPI)
    for y, (label, rows) in enumerate(series):
        acc = rows["final_test_acc"].to_numpy(dtype=float) * 100
        std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        ax.barh(y, acc.mean(), xerr=std, color=colors[label], alpha=0.35, capsize=3)
        ax.scatter(acc, np.full(len(acc), y), color=colors[label], edgecolors="black", linewidths=0.4, s=22, zorder=3)
        if label == "sgd":
            ax.axvline(acc.mean(), color="black", linestyle="--", linewidth=0.9, label="SGD mean")
    ax.set_yticks(range(len(series)), [f"{label} (n={len(rows)})" for label, rows in series])
    ax.invert_yaxis()  # the tables' order, top to bottom
    low = finals["final_test_acc"].min() * 100
    ax.set_xlim(left=max(0.0, low - 5))
    ax.set_title(f"{dataset} / {arch}: final test accuracy (dots: seeds; bars: mean +- std)")
    ax.set_xlabel("Final test accuracy (%)")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


def write_plots(run_dirs: Iterable[str | Path], out_prefix: str | Path) -> list[Path]:
    """Write ``{out_prefix}_acc_epoch.png``, ``{out_prefix}_acc_time.png``, ``{out_prefix}_acc_final.png``
    (when some run has finished) and, when some run has sharpness.json, ``{out_prefix}_acc_sharpness.png``;
    returns the written paths.

    With several (dataset, arch) pairs each pair gets its own files, named
    ``{out_prefix}_acc_epoch_{dataset}_{arch}.png`` and so on.
    """
    run_dirs = [Path(r) for r in run_dirs]
    curves = load_curves(run_dirs)
    by_pair: dict[tuple[str, str], list[Path]] = {}
    for run in run_dirs:
        meta = _run_meta(run)
        by_pair.setdefault((meta["dataset"], meta["arch"]), []).append(run)
    if curves.empty and not any((r / "sharpness.json").is_file() for r in run_dirs):
        raise ValueError("nothing to plot: no run directory has metrics.jsonl or sharpness.json")

    out_prefix = str(out_prefix)
    written: list[Path] = []
    for (dataset, arch), runs in by_pair.items():
        suffix = f"_{_slug(dataset)}_{_slug(arch)}" if len(by_pair) > 1 else ""
        pair_curves = curves[(curves["dataset"] == dataset) & (curves["arch"] == arch)]
        if not pair_curves.empty:
            written.append(plot_accuracy_vs_epoch(pair_curves, f"{out_prefix}_acc_epoch{suffix}.png"))
            written.append(plot_accuracy_vs_time(pair_curves, f"{out_prefix}_acc_time{suffix}.png"))
        for figure in (
            plot_final_accuracy(runs, f"{out_prefix}_acc_final{suffix}.png"),
            plot_accuracy_vs_sharpness(runs, f"{out_prefix}_acc_sharpness{suffix}.png"),
        ):
            if figure is not None:
                written.append(figure)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run directories or folders holding them")
    parser.add_argument("--out", required=True, help="output prefix, e.g. results/cifar10_cpu")
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)  # finished runs (those with summary.json)
    if not runs:
        raise SystemExit(f"no finished runs under {', '.join(args.paths)}")
    for path in write_plots(runs, args.out):
        print(path)


if __name__ == "__main__":
    main()
