"""What a study report is made of: run logs read back, mean +- std over seeds, Markdown tables, PNG plots.

Every number in a report comes from the runs' own outputs: the TensorBoard event files that `fpa-train`
wrote (read with TensorBoard's `EventAccumulator`) and, for recall, the run's `recall.json`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np


def bucket_name(lo: int, hi: int) -> str:
    """The name of a key-to-query distance bucket of the recall study."""
    return f"d{lo:02d}-{hi:02d}"


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] sorted by step} of every scalar in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 0})
    events.Reload()
    return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def last(scalars: dict, tag: str) -> float:
    """The value at the largest step, or nan when the tag is missing."""
    series = scalars.get(tag)
    return float(series[-1][1]) if series else math.nan


def first(scalars: dict, tag: str) -> float:
    series = scalars.get(tag)
    return float(series[0][1]) if series else math.nan


def finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the finite values; nan if none."""
    values = finite(values)
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fmt(value: Optional[float], digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "n/a" if value is None or math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.{digits}f}"


def fmt_mean_std(values: Sequence[float], digits: int) -> str:
    """"m ± s" over seeds (non-finite values left out, and counted: "(2 of 3 finite)")."""
    good = finite(values)
    if not good:
        return "n/a"
    mean, std = mean_std(good)
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if len(good) < len(values):
        text += f" ({len(good)} of {len(values)} finite)"
    return text


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table; first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, curves: dict[str, list[list[tuple[int, float]]]], title: str, ylabel: str,
                logy: bool = False) -> None:
    """One line per arm: the mean over seeds at the steps every seed logged, shaded from min to max."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, runs in curves.items():
        runs = [dict(r) for r in runs if r]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        values = np.array([[r[s] for s in steps] for r in runs], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            mean = values.mean(0)
        line, = ax.plot(steps, mean, label=f"{arm} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    _save(plt, fig, ax, path)


def plot_points(path: Path, x: Sequence, series: dict[str, list[list[float]]], title: str, xlabel: str, ylabel: str,
                logx: bool = False, xticklabels: Optional[Sequence[str]] = None) -> None:
    """One line per arm over x: mean over seeds with min-max error bars (series[arm][i] = values at x[i])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    positions = np.arange(len(x)) if xticklabels is not None else np.asarray(x, dtype=np.float64)
    for arm, per_x in series.items():
        means = np.array([mean_std(v)[0] for v in per_x])
        lows = np.array([min(finite(v), default=math.nan) for v in per_x])
        highs = np.array([max(finite(v), default=math.nan) for v in per_x])
        ax.errorbar(positions, means, yerr=[means - lows, highs - means], marker="o", capsize=3, label=arm)
    if xticklabels is not None:
        ax.set_xticks(positions, xticklabels)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: Path) -> None:
    """Grid, legend (if any line is labelled), PNG at path."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
