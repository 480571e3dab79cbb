"""Run a sweep: build and validate every grid point's config first, refuse a sweep directory whose runs were made
with other settings, then train the points one after another (reusing finished runs, resuming interrupted ones)
and rewrite the results table after each, so a crash leaves a partial table."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from unmerge import runs
from unmerge.config import (
    DICTIONARY_PRESET_DIR,
    DictionaryRunConfig,
    Override,
    config_source,
    load_dictionary_config,
    load_yaml,
    parse_overrides,
    save_yaml,
    validate,
)
from unmerge.errors import CheckpointError, ConfigError
from unmerge.io import write_atomic, write_text_atomic
from unmerge.sweep.figures import sweep_figures
from unmerge.sweep.spec import SweepPoint, SweepSpec, expand, parse_grid_argument
from unmerge.sweep.table import SweepResult, SweepRow, csv_text, markdown_table

SWEEP_SPEC = "sweep.yaml"
SWEEP_RUNS = "runs"
SWEEP_CSV = "results.csv"
SWEEP_MARKDOWN = "results.md"

TrainRun = Callable[[DictionaryRunConfig, Path], object]  # trains one config into its run directory


def load_sweep_spec(source: str, grid: Iterable[str] = (), overrides: Iterable[str | Override] = ()) -> SweepSpec:
    """A sweep spec from a YAML file that has a `grid` (see `unmerge.sweep.spec`), or from a base dictionary preset
    or config plus `--grid`-style `key=v1,v2` strings. `grid` strings add or replace grid keys; `overrides`
    (`key=value`) add fixed overrides. A relative `base` path in a spec file is read relative to that file."""
    grid = list(grid)
    path = Path(source)
    from_file = load_yaml(path) if path.suffix in {".yaml", ".yml"} and path.is_file() else {}
    if "grid" in from_file:
        base = Path(str(from_file.get("base", "")))
        if from_file.get("base") and not base.is_absolute() and (path.parent / base).is_file():
            from_file["base"] = str(path.parent / base)
        data = validate(SweepSpec, from_file, str(path)).model_dump(mode="json")
    else:
        config_source(source, DICTIONARY_PRESET_DIR)  # an unknown preset or missing file is named here
        data = {"base": source, "grid": {}, "overrides": {}}
    data["grid"] |= dict(parse_grid_argument(text) for text in grid)
    data["overrides"] |= {override.key: override.value for override in parse_overrides(overrides)}
    described = f"sweep of {source}" + (f" with --grid {grid}" if grid else "")
    if not data["grid"]:
        raise ConfigError(
            f"{described}: no grid; add --grid key=v1,v2 (e.g. --grid method.penalty.coeff=0.03,0.1) "
            "or pass a sweep YAML file with a `grid:` mapping"
        )
    return validate(SweepSpec, data, described)


def point_configs(spec: SweepSpec) -> list[tuple[SweepPoint, DictionaryRunConfig]]:
    """Every grid point's validated config, built before any training so that a bad point fails the sweep early."""
    fixed = spec.fixed_overrides()
    load_dictionary_config(spec.base, fixed)  # errors in the base or in the fixed overrides, named once
    configs = []
    for point in expand(spec):
        try:
            configs.append((point, load_dictionary_config(spec.base, fixed + point.overrides)))
        except ConfigError as error:
            described = " ".join(override.text for override in point.overrides)
            raise ConfigError(f"sweep grid point {point.name} ({described}): {error}") from None
    return configs


def _check_sweep_dir(out_dir: Path, configs: list[tuple[SweepPoint, DictionaryRunConfig]]) -> None:
    """Refuse, before anything is trained or written, a sweep directory whose runs were made with other settings."""
    for point, config in configs:
        run_dir = out_dir / SWEEP_RUNS / point.name
        differences = runs.differences_from_saved(run_dir, config)
        if differences:
            raise CheckpointError(
                f"{run_dir} was trained with other settings ({'; '.join(differences)}); a sweep "
                "directory holds one config per grid point, so give the changed sweep a new --out "
                "(or rerun it with the original settings)"
            )


def run_sweep(
    spec: SweepSpec, out_dir: Path, train: TrainRun, log: Callable[[str], None] | None = print
) -> SweepResult:
    """Train every grid point of `spec` in turn with `train` into `out_dir/runs/<name>` and write `results.csv`,
    `results.md`, the Pareto figures and `sweep.yaml` to `out_dir`.

    Rerunning the same sweep reuses finished runs (same config, metrics.json present) and resumes interrupted ones
    from their newest checkpoint; extending the grid trains only the new points. Metrics are read from each run's
    metrics.json, never recomputed. `log` receives one progress line per run (None: silent).
    """
    out_dir = Path(out_dir)
    configs = point_configs(spec)
    _check_sweep_dir(out_dir, configs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / SWEEP_SPEC, lambda tmp: save_yaml(spec, tmp))
    rows: list[SweepRow] = []
    keys = list(spec.grid)
    for number, (point, config) in enumerate(configs, start=1):
        run_dir = out_dir / SWEEP_RUNS / point.name
        skipped = runs.is_finished(run_dir)
        if log:
            log(f"[{number}/{len(configs)}] {point.name}: " + ("finished earlier, reused" if skipped else "training"))
        if not skipped:
            train(config, run_dir)
        rows.append(SweepRow(point.name, point.settings, run_dir, runs.read_metrics(run_dir), skipped))
        write_text_atomic(out_dir / SWEEP_CSV, csv_text(rows, keys))
        write_text_atomic(out_dir / SWEEP_MARKDOWN, markdown_table(rows, keys))
    figures = sweep_figures(rows, spec.group_keys(), out_dir)
    return SweepResult(out_dir, spec, rows, out_dir / SWEEP_CSV, out_dir / SWEEP_MARKDOWN, figures)
