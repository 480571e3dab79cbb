"""HTML pages from the jinja2 templates in `report/templates/` (autoescaped: every value from a run, a config or
a model's text is escaped unless it is markup a template rendered): a run's `report.html` (one self-contained
page, figures embedded as data URIs, nothing fetched: the run's metrics, its figures, its resolved config and
further sections such as a language model's latents with top-activating snippets) and an `index.html` comparing
runs side by side (sortable, linking each run's report)."""

from __future__ import annotations

import base64
import math
import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from unmerge.io import write_text_atomic

REPORT_FILE = "report.html"
INDEX_FILE = "index.html"
TEMPLATES = Environment(
    loader=PackageLoader("unmerge", "report/templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def render(template: str, **values: Any) -> Markup:
    """A template rendered with `values` (escaped as the template's extension says), as markup."""
    return Markup(TEMPLATES.get_template(template).render(**values))


def format_value(value: object) -> str:
    """A metric as the pages show it: floats to 6 significant digits, NaN as `nan`."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _figure(path: Path) -> dict[str, str]:
    return {"data": base64.b64encode(path.read_bytes()).decode("ascii"), "name": path.stem.replace("_", " ")}


def write_run_report(
    run_dir: Path,
    title: str,
    metrics: dict[str, object],
    figures: list[Path],
    config_file: str = "config.yaml",
    sections: Markup | str = "",
) -> Path:
    """Write `run_dir/report.html` (atomically) and return its path; `sections` is further markup (e.g. the
    latents of a dictionary on a language model, `unmerge.report.latents`), placed before the config (plain text
    is escaped)."""
    config_path = run_dir / config_file
    page = render(
        "run_report.html",
        title=title,
        run_dir=str(run_dir),
        metrics=[(key, format_value(value)) for key, value in metrics.items()],
        figures=[_figure(path) for path in figures],
        sections=sections,
        config=config_path.read_text() if config_path.is_file() else "(no config)",
    )
    path = run_dir / REPORT_FILE
    write_text_atomic(path, page)
    return path


def write_index(out_dir: Path, runs: list[tuple[Path, str, dict[str, object]]], columns: list[str]) -> Path:
    """`out_dir/index.html`: one row per run (name linked to its report, then `columns` of its metrics), sortable
    by clicking a column header; self-contained but for the links."""
    rows = []
    for run_dir, title, metrics in runs:
        report = run_dir / REPORT_FILE
        cells = [
            {"sort": format_value(metrics.get(c, "")), "shown": format_value(metrics[c]) if c in metrics else "—"}
            for c in columns
        ]
        link = os.path.relpath(report, out_dir) if report.is_file() else None
        rows.append({"title": title, "link": link, "cells": cells})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INDEX_FILE
    write_text_atomic(path, render("index.html", title="unmerge runs", runs=rows, columns=columns))
    return path
