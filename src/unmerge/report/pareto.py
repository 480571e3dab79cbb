"""Figures of a sweep (PNG): sparsity against reconstruction and recovery, with each group's Pareto front, and
dead latents. One point per run; runs that differ only in strength (`STRENGTH_KEYS`) or seed share a group."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from unmerge.report.figures import STYLE, save_figure  # noqa: E402
from unmerge.sweep import STRENGTH_KEYS, format_value, pareto_front, short_labels  # noqa: E402

if TYPE_CHECKING:
    from unmerge.sweep import SweepRow

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")
ANNOTATE_AT_MOST = 40  # label points with their strength only while the figure stays readable


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str = ""


def tradeoff_figure(groups: dict[str, list[Point]], x_label: str, y_label: str, title: str, path: Path,
                    better_y: Literal["lower", "higher"] | None = None) -> Path:
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
                        axis.annotate(p.label, (p.x, p.y), xytext=(3, 3), textcoords="offset points", fontsize=7,
                                      color=colour)
        if all_x and min(all_x) > 0 and max(all_x) / min(all_x) > 10:
            axis.set_xscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if any(groups):
            axis.legend(fontsize=7, frameon=False)
        return save_figure(figure, path)


def _groups(rows: list[SweepRow], group_keys: list[str], x: str, y: str,
            label_keys: list[str]) -> dict[str, list[Point]]:
    """Points (x, y) of the runs that report both metrics, grouped by the values of `group_keys`."""
    labels = short_labels(group_keys)
    groups: dict[str, list[Point]] = {}
    for row in rows:
        if x not in row.metrics or y not in row.metrics:
            continue
        group = ", ".join(f"{labels[key]}={format_value(row.settings[key])}" for key in group_keys)
        label = ",".join(format_value(row.settings[key]) for key in label_keys)
        groups.setdefault(group, []).append(Point(row.metrics[x], row.metrics[y], label))
    return groups


def sweep_figures(rows: list[SweepRow], group_keys: list[str], directory: Path) -> list[Path]:
    """`pareto_l0_fvu.png`, `pareto_l0_mcc.png` (only when the data have true features, i.e. runs report MCC) and
    `dead_latents.png` in `directory`; points are labelled with their strength values."""
    strengths = [key for key in STRENGTH_KEYS if rows and key in rows[0].settings]
    labelled = f"\npoints labelled with {', '.join(short_labels(strengths).values())}" if strengths else ""
    l0 = "L0 (active latents per input)"
    paths = [tradeoff_figure(_groups(rows, group_keys, "l0", "fvu", strengths), l0,
                             "FVU (fraction of variance unexplained)",
                             "sparsity vs reconstruction (lower left is better)" + labelled,
                             directory / "pareto_l0_fvu.png", better_y="lower")]
    if any("mcc" in row.metrics for row in rows):
        paths.append(tradeoff_figure(_groups(rows, group_keys, "l0", "mcc", strengths), l0,
                                     "MCC (Hungarian-matched mean cosine to true features)",
                                     "sparsity vs feature recovery (upper left is better)" + labelled,
                                     directory / "pareto_l0_mcc.png", better_y="higher"))
    dead = "dead_fraction" if any("dead_fraction" in row.metrics for row in rows) else "dead_latents"
    paths.append(tradeoff_figure(_groups(rows, group_keys, "l0", dead, strengths), l0,
                                 "dead latents" + (" (fraction of the width)" if dead == "dead_fraction" else ""),
                                 "dead latents at the end of training" + labelled, directory / "dead_latents.png"))
    return paths
