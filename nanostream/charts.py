"""Every chart NanoStream draws, as PNG bytes: confusion matrix, class probabilities, experiment
arms and learning curves. Data in, PNG out: matplotlib only, so the app, the flows, the worker and
the experiments draw the same pictures and nothing here knows a model, a store or Streamlit."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # not pyplot: no global state, safe from any thread

DPI = 110               # sharp on a laptop screen at the widths the pages show, small files
LONG_TITLE = 60         # characters: a sentence of advice, set smaller to fit the figure's width


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=DPI, bbox_inches="tight")
    return out.getvalue()


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed), as the experiments' tables print it."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Rows: true category; columns: predicted; each cell its count."""
    n = len(labels)
    size = max(3.0, 0.7 * n + 1.5)
    figure = Figure(figsize=(size, size * 0.9))
    ax = figure.subplots()
    ax.imshow(confusion, cmap="Blues")
    peak = max((max(row) for row in confusion if len(row)), default=0) or 1
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > peak / 2 else "black", fontsize=11)
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true category")
    ax.set_title("Held-out images")
    return _png(figure)


def probability_png(probs: dict[str, float], threshold: float, top: int = 5) -> bytes:
    """Horizontal bars of the top classes, the threshold as a dashed line."""
    best = sorted(probs.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
    figure = Figure(figsize=(4.2, 0.45 * len(best) + 0.7))
    ax = figure.subplots()
    colors = ["#9aa5b1"] * (len(best) - 1) + ["#1f77b4" if best[-1][1] >= threshold else "#d62728"]
    ax.barh([name for name, _ in best], [p for _, p in best], color=colors)
    for y, (_, p) in enumerate(best):
        ax.text(min(p + 0.02, 0.85), y, f"{p:.0%}", va="center", fontsize=9)
    ax.axvline(threshold, color="#555", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (left of the dashed line: 'not sure')")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png(figure)


def arms_png(arms: Sequence[tuple[str, Sequence[float]]], xlabel: str, title: str = "") -> bytes:
    """Each arm's per-seed accuracies as dots and their mean +- 1 std; the first arm's mean as a
    reference line (the arm the others are compared with)."""
    figure = Figure(figsize=(7, 0.42 * len(arms) + 1.6))
    ax = figure.add_subplot()
    ypos = np.arange(len(arms))[::-1]
    for y0, (_, accuracies) in zip(ypos, arms):
        jitter = np.linspace(-0.18, 0.18, len(accuracies)) if len(accuracies) > 1 else np.zeros(1)
        ax.scatter(accuracies, y0 + jitter, s=12, color="#9ecae1", zorder=2,
                   label="one seed" if y0 == ypos[0] else None)
    means = [statistics.fmean(accuracies) for _, accuracies in arms]
    ax.errorbar(means, ypos, xerr=[_std(accuracies) for _, accuracies in arms], fmt="D", color="#08519c",
                capsize=3, zorder=3, label="mean +- std over seeds")
    ax.axvline(means[0], color="grey", linestyle="--", linewidth=1, label=f"mean of {arms[0][0]}")
    ax.set_yticks(ypos, [name for name, _ in arms])
    lo = min(min(accuracies) for _, accuracies in arms)
    ax.set_xlim(max(0.0, lo - 0.05), 1.005)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    return _png(figure)


def learning_curve_png(points: Sequence[tuple[int, Sequence[float]]], target: float,
                       fit: tuple[float, float, float] | None = None, needed: int | None = None,
                       fit_until: float | None = None, title: str = "") -> bytes:
    """Measured accuracy per training-set size (seeds as dots, mean +- std), the fitted power law
    error = a * n**-b + c drawn out to fit_until (images per class), the target as a dashed line
    and the images per class it needs (`needed`) as a dotted one.

    points: (images per class, one accuracy per seed) for each size measured."""
    figure = Figure(figsize=(7, 4.2))
    ax = figure.add_subplot()
    sizes = [size for size, _ in points]
    for size, accuracies in points:
        ax.scatter([size] * len(accuracies), accuracies, s=10, color="#9ecae1", zorder=2)
    ax.errorbar(sizes, [statistics.fmean(a) for _, a in points], yerr=[_std(a) for _, a in points], fmt="o",
                color="#08519c", capsize=3, zorder=3, label="measured (mean +- std)")
    if fit is not None:
        a, b, c = fit
        right = max(max(sizes), fit_until or 0)
        xs = np.geomspace(max(1, min(sizes) / 1.5), right * 1.3, 200)
        ax.plot(xs, 1 - (a * xs ** -b + c), color="#e6550d", label=f"fit: error = {a:.2f} n^-{b:.2f} + {c:.3f}")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    if needed is not None:
        ax.axvline(needed, color="#31a354", linestyle=":", label=f"~{needed} images per class")
    ax.set_xscale("log")
    ticks = sorted(set(sizes) | ({needed} if needed else set()))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9 if len(title) > LONG_TITLE else None)
    ax.legend(loc="lower right", fontsize=8)
    return _png(figure)
