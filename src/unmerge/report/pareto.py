"""Trade-off figures (PNG): groups of points, each in its own colour, each group's Pareto front drawn as a line
(`unmerge.sweep.figures` draws a sweep's with them)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from unmerge.report.figures import STYLE, save_figure

COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
ANNOTATE_AT_MOST = 40  # label points with their strength only while the figure stays readable


def pareto_front(xs: Sequence[float], ys: Sequence[float], maximize_y: bool = False) -> list[int]:
    """Indices of the points not dominated by another, ordered by x. Lower x is better; lower y is better, or
    higher with `maximize_y`. Point j dominates i when it is at least as good in both and better in one; equal
    points do not dominate each other, so both stay. Points with a NaN or infinite coordinate are left out."""
    sign = -1.0 if maximize_y else 1.0
    points = [
        (i, float(x), sign * float(y))
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
        if math.isfinite(x) and math.isfinite(y)
    ]
    front = [
        (x, i) for i, x, y in points if not any(xj <= x and yj <= y and (xj < x or yj < y) for _, xj, yj in points)
    ]
    return [i for _, i in sorted(front)]


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str = ""


def tradeoff_figure(
    groups: dict[str, list[Point]],
    x_label: str,
    y_label: str,
    title: str,
    path: Path,
    better_y: Literal["lower", "higher"] | None = None,
) -> Path:
    """Scatter each group in its own colour; with `better_y` ("lower" or "higher"), join the group's Pareto-optimal
    points (lower x is always better) with a line. Non-finite points are left out."""
    with plt.rc_context(STYLE):
        figure, axis = plt.subplots(figsize=(5.2, 3.8))
        all_x = []
        for colour, (group, points) in zip(itertools.cycle(COLOURS), groups.items(), strict=False):
            points = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
            if not points:
                continue
            xs, ys = [p.x for p in points], [p.y for p in points]
            all_x += xs
            axis.scatter(xs, ys, color=colour, s=22, alpha=0.8, label=group or None, zorder=3)
            if better_y is not None:
                front = pareto_front(xs, ys, maximize_y=better_y == "higher")
                axis.plot([xs[i] for i in front], [ys[i] for i in front], color=colour, lw=1.2, zorder=2)
            if sum(len(g) for g in groups.values()) <= ANNOTATE_AT_MOST:
                for p in points:
                    if p.label:
                        axis.annotate(
                            p.label, (p.x, p.y), xytext=(3, 3), textcoords="offset points", fontsize=7, color=colour
                        )
        if all_x and min(all_x) > 0 and max(all_x) / min(all_x) > 10:
            axis.set_xscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if any(groups):
            axis.legend(fontsize=7, frameon=False)
        return save_figure(figure, path)
