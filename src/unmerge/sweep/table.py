"""A sweep's results: one row per grid point, as CSV and as a Markdown table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unmerge.sweep.spec import SweepSpec, format_value, yaml_text

TABLE_METRICS = ("l0", "fvu", "recall_mmcs", "mcc", "matched/0.9", "dead_latents", "duplicate_latents", "shrinkage")
"""Columns of the results table after the grid keys, each shown when at least one run's metrics.json has it."""


@dataclass
class SweepRow:
    """One finished run of a sweep: its grid values and the metrics read from its `metrics.json`."""

    name: str
    settings: dict[str, Any]
    run_dir: Path
    metrics: dict[str, float]
    skipped: bool = False  # finished by an earlier invocation of the sweep, so not trained again


def table_columns(rows: Sequence[SweepRow]) -> list[str]:
    """`TABLE_METRICS` that at least one row has, in that order."""
    return [key for key in TABLE_METRICS if any(key in row.metrics for row in rows)]


def format_number(value: float | None) -> str:
    """A metric as the results tables show it: integers plain, others to 4 significant digits."""
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def csv_text(rows: Sequence[SweepRow], grid_keys: Sequence[str]) -> str:
    """The results as CSV: `run`, the grid keys, then the metrics (full precision, empty where absent)."""
    columns = table_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *grid_keys, *columns])
    for row in rows:
        writer.writerow(
            [
                row.name,
                *(yaml_text(row.settings[key]) for key in grid_keys),
                *(repr(row.metrics[key]) if key in row.metrics else "" for key in columns),
            ]
        )
    return buffer.getvalue()


def markdown_table(rows: Sequence[SweepRow], grid_keys: Sequence[str]) -> str:
    """The results as a Markdown table (4 significant digits), readable in a terminal too."""
    columns = table_columns(rows)
    header = [*grid_keys, *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [format_value(row.settings[key]) for key in grid_keys]
        cells += [format_number(row.metrics.get(key)) for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class SweepResult:
    """What a sweep wrote (`unmerge.sweep.runner.run_sweep`): one row per grid point (in grid order), the tables
    and the figures."""

    directory: Path
    spec: SweepSpec
    rows: list[SweepRow]
    csv_path: Path
    markdown_path: Path
    figures: list[Path]

    def markdown(self) -> str:
        return markdown_table(self.rows, list(self.spec.grid))
