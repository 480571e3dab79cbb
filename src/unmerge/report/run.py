"""A run's report: `metrics.json`, the training-curves figure and `report.html` with every figure; an index of
runs side by side."""

from __future__ import annotations

from pathlib import Path

from unmerge import runs
from unmerge.report.figures import training_curves_figure
from unmerge.report.html import write_index, write_run_report


def publish(
    run_dir: Path, title: str, metrics: dict[str, float], figures: list[Path], sections: str = ""
) -> tuple[list[Path], Path]:
    """Finish a run: write `metrics.json`, the training curves and `report.html` (with `sections`, further HTML);
    returns (all figures, the report's path)."""
    runs.write_metrics(run_dir, metrics)
    curves = training_curves_figure(run_dir / runs.TRAIN_LOG, run_dir / runs.FIGURES_DIR / "training_curves.png")
    figures = ([curves] if curves else []) + figures
    return figures, write_run_report(run_dir, title, metrics, figures, sections=sections)


def refresh(run_dir: Path, title: str, sections: str = "") -> Path:
    """Rewrite a finished run's `report.html` from its saved `metrics.json` and every figure in `figures/`."""
    figures = sorted((run_dir / runs.FIGURES_DIR).glob("*.png"))
    return write_run_report(run_dir, title, runs.read_metrics(run_dir), figures, sections=sections)


def runs_index(run_dirs: list[Path], out_dir: Path, columns: list[str] | None = None) -> Path:
    """`out_dir/index.html` comparing finished runs (SPD or dictionary): their metrics side by side, sortable,
    each run linked to its `report.html`. Columns: `columns`, else the metrics every run has (at most 40)."""
    listed = [
        (Path(run_dir), f"{runs.run_name(run_dir)} · {Path(run_dir).name}", runs.read_metrics(run_dir))
        for run_dir in run_dirs
    ]
    if columns is None:
        common = set.intersection(*(set(metrics) for _, _, metrics in listed)) if listed else set()
        columns = [key for key in listed[0][2] if key in common][:40] if listed else []
    return write_index(Path(out_dir), listed, columns)
