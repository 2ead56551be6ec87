"""The figures read first: speed against quality per technique, and asv's per-commit series.

Each function returns a PNG (matplotlib's Agg backend) for ``bench.files`` to write atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.console import number
from bench.files import figure_writer

WITHIN = "#2ca02c"
OVER = "#d62728"
MISSING = "#7f7f7f"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        figure_writer(fig)(buffer)
    finally:
        pyplot().close(fig)
    return buffer.getvalue()


@dataclass(frozen=True)
class SpeedPoint:
    """One technique: its median wall speedup with the interquartile range, and its quality."""

    name: str
    speedup: float
    q1: float | None
    q3: float | None
    quality_delta: float | None  # relative test-perplexity change; None: not measured
    counts: bool | None  # within the quality budget; None: no quality figure
    noisy: bool


def speed_points(rows: Iterable[Mapping[str, Any]], counts: Any) -> list[SpeedPoint]:
    """Points from result rows (results.json's ``rows``); ``counts(delta)`` is the budget rule
    (``Target.counts``). Rows without a finite speedup are left out."""
    points = []
    for row in rows:
        speed = number(row.get("wall_speedup"))
        if speed is None or speed <= 0:
            continue
        delta = number(row.get("quality_delta"))
        points.append(SpeedPoint(str(row.get("technique", "?")), speed,
                                 number(row.get("wall_q1")), number(row.get("wall_q3")), delta,
                                 None if delta is None else bool(counts(delta)),
                                 bool(row.get("noise_warning"))))
    return points


def log_ticks(ax: Any, axis: str) -> None:
    """Readable ticks (``0.5x``, ``1x``, ``2x`` ...) on a log axis."""
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
             if low <= t <= high]
    labels = [f"{t:g}x" for t in ticks]
    if axis == "y":
        ax.set_yticks(ticks, labels)
        ax.minorticks_off()
    else:
        ax.set_xticks(ticks, labels)


def percent_ticks(ax: Any) -> None:
    low, high = ax.get_xlim()
    ticks = [t for t in (-50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
             if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:+g}%" if t else "0" for t in ticks])


def place_labels(ax: Any, anchors: Sequence[tuple[float, float]], texts: Sequence[str],
                 fontsize: float = 8) -> list[tuple[float, float]]:
    """Offsets (points) for labels beside ``anchors`` (data coordinates): right of the point,
    or left of it near the right edge, and lifted where they would overlap a label placed
    before (lowest first). Widths are estimated from the text length."""
    scale = ax.figure.dpi / 72
    right_edge = ax.transAxes.transform((1, 0))[0]
    height, pad = 1.5 * fontsize * scale, 8 * scale
    shown = [ax.transData.transform(a) for a in anchors]
    boxes: list[tuple[float, float, float]] = []  # left, right, y (pixels)
    offsets = [(0.0, 0.0)] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda i: shown[i][1]):
        x, y = shown[i]
        width = 0.6 * fontsize * scale * len(texts[i])
        left = x + pad if x + pad + width <= right_edge else x - pad - width
        lifted = y
        while any(left < r and b < left + width and abs(lifted - by) < height
                  for b, r, by in boxes):
            lifted += height
        boxes.append((left, left + width, lifted))
        offsets[i] = ((left - x) / scale, (lifted - y) / scale)
    return offsets


def speed_quality(points: Sequence[SpeedPoint], budget: float, target: float,
                  title: str) -> bytes:
    """Wall speedup (log axis, interquartile range as error bars) against the test perplexity
    change, with the quality budget, the target and the region that meets both; techniques over
    the budget are red crosses and say so, noisy ones are hollow. The perplexity axis is linear
    within the budget and logarithmic beyond it when some technique is far over it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    edge = 100 * budget
    xs = [0.0 if p.quality_delta is None else 100 * p.quality_delta for p in points]
    x_low = min([-1.0, *xs]) * 1.3 - 0.5
    x_high = max([2 * edge, *xs]) * 1.3 + 0.5
    lows = [p.q1 if p.q1 is not None else p.speedup for p in points]
    highs = [p.q3 if p.q3 is not None else p.speedup for p in points]
    y_low = min([0.5, *lows]) / 1.25
    y_high = max([target, *highs]) * 1.6
    ax.set_yscale("log")
    if max(xs, default=0) > 4 * edge or min(xs, default=0) < -4 * edge:
        ax.set_xscale("symlog", linthresh=edge, linscale=2)
    ax.set_xlim(x_low, x_high)
    ax.set_ylim(y_low, y_high)
    ax.axvspan(edge, x_high, color=OVER, alpha=0.07, lw=0)
    ax.fill_between([x_low, edge], target, y_high, color=WITHIN, alpha=0.10, lw=0)
    ax.axvline(edge, color=OVER, ls="--", lw=1.2)
    ax.axhline(target, color="black", ls="--", lw=1.2)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.text(edge, y_high, f" +{budget:.0%} budget", color=OVER, va="top", fontsize=9)
    ax.text(x_low, target, f" target {target:g}x", va="bottom", fontsize=9)
    log_ticks(ax, "y")
    percent_ticks(ax)
    notes = [p.name + {False: " (over budget)", None: " (quality n/a)", True: ""}[p.counts]
             + (", noisy" if p.noisy else "") for p in points]
    offsets = place_labels(ax, [(x, p.speedup) for x, p in zip(xs, points, strict=True)], notes)
    for x, p, note, (dx, dy) in zip(xs, points, notes, offsets, strict=True):
        color = {True: WITHIN, False: OVER, None: MISSING}[p.counts]
        if p.q1 is not None and p.q3 is not None:
            ax.errorbar([x], [p.speedup], yerr=[[p.speedup - p.q1], [p.q3 - p.speedup]],
                        fmt="none", ecolor=color, elinewidth=1.4, capsize=4, zorder=2)
        marker = "X" if p.counts is False else ("s" if p.counts is None else "o")
        ax.scatter([x], [p.speedup], s=80, marker=marker, zorder=3, linewidths=1.6,
                   facecolors="white" if p.noisy else color, edgecolors=color)
        ax.annotate(note, (x, p.speedup), xytext=(dx, dy), textcoords="offset points",
                    fontsize=8, va="center", color=OVER if p.counts is False else "black",
                    arrowprops={"arrowstyle": "-", "color": "#999", "lw": 0.6} if dy else None)
    ax.set_xlabel("test perplexity change against the dense model, lower is better")
    ax.set_ylabel("wall speedup (median, IQR bars), log scale")
    ax.set_title(f"Speed against quality per technique: {title}", fontsize=11)
    ax.legend(handles=[
        Line2D([], [], marker="o", ls="", color=WITHIN, label="within the budget (counts)"),
        Line2D([], [], marker="X", ls="", color=OVER, label="over the budget (does not count)"),
        Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor="black",
               label="hollow: noisy speedup (IQR above the noise limit)"),
        Patch(color=WITHIN, alpha=0.25, label=f"goal: {target:g}x within +{budget:.0%}"),
        Line2D([], [], color="black", lw=0.8, label="1x: the dense model's speed"),
    ], fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.93), framealpha=0.9)
    fig.tight_layout()
    return png(fig)


@dataclass(frozen=True)
class Series:
    """One asv benchmark at one parameter combination, one value per commit (None: failed or
    skipped at that commit)."""

    benchmark: str
    params: str
    unit: str
    values: tuple[float | None, ...]


def asv_history(commits: Sequence[str], series: Sequence[Series], title: str) -> bytes:
    """Small multiples, one per benchmark, one line per parameter combination, commits in
    order along x (a gap where a commit has no value)."""
    plt = pyplot()
    names = list(dict.fromkeys(s.benchmark for s in series))
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 2.9 * rows + 0.6),
                             squeeze=False)
    x = list(range(len(commits)))
    step = max(1, math.ceil(len(commits) / 8))
    for ax, name in zip(axes.flat, names, strict=False):
        mine = [s for s in series if s.benchmark == name]
        for s in mine:
            y = [math.nan if v is None else v for v in s.values]
            ax.plot(x, y, marker="o", ms=3, lw=1.2, label=s.params or None)
        ax.set_title(name.split(".", 1)[-1], fontsize=9)
        ax.set_ylabel(mine[0].unit[:40], fontsize=7)
        ax.set_xticks(x[::step], [c[:7] for c in commits][::step], fontsize=7, rotation=30)
        ax.tick_params(axis="y", labelsize=7)
        if any(s.params for s in mine):
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return png(fig)
