"""A run's report: `metrics.json`, the training-curves figure and `report.html` with every figure."""

from __future__ import annotations

from pathlib import Path

from unmerge import runs
from unmerge.report.figures import training_curves_figure
from unmerge.report.html import write_run_report


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
