"""Sweeps: grids of dictionary runs (`spec`), their results table (`table`) and Pareto figures (`figures`), and
the runner that trains every grid point (`runner`)."""

from unmerge.report.pareto import pareto_front
from unmerge.sweep.runner import SWEEP_CSV, SWEEP_MARKDOWN, SWEEP_RUNS, SWEEP_SPEC, load_sweep_spec, run_sweep
from unmerge.sweep.spec import (
    STRENGTH_KEYS,
    SweepPoint,
    SweepSpec,
    expand,
    format_value,
    parse_grid_argument,
    short_labels,
    yaml_text,
)
from unmerge.sweep.table import TABLE_METRICS, SweepResult, SweepRow, csv_text, format_number, markdown_table

__all__ = [
    "STRENGTH_KEYS",
    "SWEEP_CSV",
    "SWEEP_MARKDOWN",
    "SWEEP_RUNS",
    "SWEEP_SPEC",
    "TABLE_METRICS",
    "SweepPoint",
    "SweepResult",
    "SweepRow",
    "SweepSpec",
    "csv_text",
    "expand",
    "format_number",
    "format_value",
    "load_sweep_spec",
    "markdown_table",
    "parse_grid_argument",
    "pareto_front",
    "run_sweep",
    "short_labels",
    "yaml_text",
]
