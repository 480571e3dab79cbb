"""Figures of a sweep (PNG): sparsity against reconstruction and recovery, with each group's Pareto front, and
dead latents. One point per run; runs that differ only in strength (`STRENGTH_KEYS`) or seed share a group."""

from __future__ import annotations

from pathlib import Path

from unmerge.report.pareto import Point, tradeoff_figure
from unmerge.sweep.spec import STRENGTH_KEYS, format_value, short_labels
from unmerge.sweep.table import SweepRow


def _groups(
    rows: list[SweepRow], group_keys: list[str], x: str, y: str, label_keys: list[str]
) -> dict[str, list[Point]]:
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
    paths = [
        tradeoff_figure(
            _groups(rows, group_keys, "l0", "fvu", strengths),
            l0,
            "FVU (fraction of variance unexplained)",
            "sparsity vs reconstruction (lower left is better)" + labelled,
            directory / "pareto_l0_fvu.png",
            better_y="lower",
        )
    ]
    if any("mcc" in row.metrics for row in rows):
        paths.append(
            tradeoff_figure(
                _groups(rows, group_keys, "l0", "mcc", strengths),
                l0,
                "MCC (Hungarian-matched mean cosine to true features)",
                "sparsity vs feature recovery (upper left is better)" + labelled,
                directory / "pareto_l0_mcc.png",
                better_y="higher",
            )
        )
    dead = "dead_fraction" if any("dead_fraction" in row.metrics for row in rows) else "dead_latents"
    paths.append(
        tradeoff_figure(
            _groups(rows, group_keys, "l0", dead, strengths),
            l0,
            "dead latents" + (" (fraction of the width)" if dead == "dead_fraction" else ""),
            "dead latents at the end of training" + labelled,
            directory / "dead_latents.png",
        )
    )
    return paths
