"""HTML pages: a run's `report.html` (one self-contained page, figures embedded as data URIs, nothing fetched:
the run's metrics, its figures, its resolved config and, for a dictionary on a language model, its latents with
top-activating snippets) and an `index.html` comparing runs side by side (sortable, linking each run's report)."""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path

from unmerge.io import write_text_atomic

REPORT_FILE = "report.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.85em; } img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.85em; overflow-x: auto; }
"""


def _format(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem.replace("_", " "))
    return f'<figure><img src="data:image/png;base64,{data}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def write_run_report(
    run_dir: Path,
    title: str,
    metrics: dict[str, object],
    figures: list[Path],
    config_file: str = "config.yaml",
    sections: str = "",
) -> Path:
    """Write `run_dir/report.html` (atomically) and return its path; `sections` is further HTML (e.g. the
    latents of a dictionary on a language model), placed before the config."""
    rows = "\n".join(
        f"<tr><td>{html.escape(key)}</td><td class=value>{html.escape(_format(value))}</td></tr>"
        for key, value in metrics.items()
    )
    config_path = run_dir / config_file
    config = html.escape(config_path.read_text()) if config_path.is_file() else "(no config)"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Run directory: <code>{html.escape(str(run_dir))}</code></p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th></tr>
{rows}
</table>
<h2>Figures</h2>
{"".join(_figure(path) for path in figures) or "<p>(none)</p>"}
{sections}
<h2>Config</h2>
<pre>{config}</pre>
</body></html>
"""
    path = run_dir / REPORT_FILE
    write_text_atomic(path, page)
    return path


INDEX_FILE = "index.html"
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(header => header.addEventListener("click", () => {
  const body = header.closest("table").tBodies[0], column = header.cellIndex;
  const ascending = header.dataset.order !== "asc";
  header.dataset.order = ascending ? "asc" : "desc";
  const key = row => { const text = row.cells[column].dataset.sort ?? row.cells[column].textContent;
                       const number = parseFloat(text); return isNaN(number) ? text : number; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1); }).forEach(row => body.appendChild(row));
}));
"""


def write_index(out_dir: Path, runs: list[tuple[Path, str, dict[str, object]]], columns: list[str]) -> Path:
    """`out_dir/index.html`: one row per run (name linked to its report, then `columns` of its metrics), sortable
    by clicking a column header; self-contained but for the links."""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in ["run", *columns])
    rows = []
    for run_dir, title, metrics in runs:
        report = run_dir / REPORT_FILE
        link = (
            f'<a href="{html.escape(str(os.path.relpath(report, out_dir)))}">{html.escape(title)}</a>'
            if report.is_file()
            else html.escape(title)
        )
        cells = "".join(
            f'<td class=value data-sort="{html.escape(_format(metrics.get(c, "")))}">'
            f"{html.escape(_format(metrics[c]) if c in metrics else '—')}</td>"
            for c in columns
        )
        rows.append(f'<tr><td data-sort="{html.escape(title)}">{link}</td>{cells}</tr>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unmerge runs</title><style>{STYLE}
th {{ cursor: pointer; text-align: left; }}</style></head>
<body>
<h1>{len(runs)} runs</h1>
<p>Click a column header to sort.</p>
<table class=sortable><thead><tr>{header}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{SORT_SCRIPT}</script>
</body></html>
"""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INDEX_FILE
    write_text_atomic(path, page)
    return path
