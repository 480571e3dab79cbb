"""The run directory's lifecycle: create it with its resolved config, recognise it again (same config: resume;
another config: refuse, naming the differences), and finish it with `metrics.json`.

A run directory holds `config.yaml` (the resolved config), `target/` (a toy target's trained weights, so the
directory is self-contained), `checkpoints/`, `train_log.jsonl`, `eval_log.jsonl`, `metrics.json`, `figures/`,
`report.html` and, by kind, `dictionary.safetensors`, `ground_truth.safetensors` or `grouping.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from unmerge.config import StrictModel, load_yaml, save_yaml, validate
from unmerge.errors import CheckpointError
from unmerge.io import write_atomic, write_json_atomic

RUN_CONFIG = "config.yaml"
METRICS_FILE = "metrics.json"
TARGET_DIR = "target"
FIGURES_DIR = "figures"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
DICTIONARY_FILE = "dictionary.safetensors"  # the trained dictionary with its normalisation folded in
GROUND_TRUTH_FILE = "ground_truth.safetensors"  # a toy source's true features (and hierarchy parents)
GROUPING_FILE = "grouping.json"  # the chosen grouping of a run's subcomponents, with its merge history

ConfigT = TypeVar("ConfigT", bound=StrictModel)


@dataclass
class RunResult:
    """What a finished (or evaluated) run left: its metrics, figures and report, and the step it resumed from."""

    run_dir: Path
    metrics: dict[str, float]
    figures: list[Path]
    resumed_from: int
    report: Path | None = None


RESUMABLE_ELSEWHERE = ("train.device:", "train.fsdp:", "train.loggers:")  # checkpoints hold full tensors


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old → new` for every leaf where two plain config dicts differ."""
    differences = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            differences += config_differences(left, right, f"{prefix}{key}.")
        elif left != right:
            differences.append(f"{prefix}{key}: {left!r} → {right!r}")
    return differences


def saved_config(run_dir: Path, config_cls: type[ConfigT]) -> ConfigT:
    """The resolved config a run directory was made with (saved by an earlier version: upgraded first)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory ({RUN_CONFIG} missing)")
    return validate(config_cls, config_cls.upgrade_saved(load_yaml(path)), str(path))


def differences_from_saved(run_dir: Path, config: StrictModel) -> list[str] | None:
    """How `config` differs from the one saved in `run_dir` (empty: the same run), or None if none is saved."""
    if not (Path(run_dir) / RUN_CONFIG).is_file():
        return None
    previous = saved_config(run_dir, type(config))
    differences = config_differences(previous.model_dump(mode="json"), config.model_dump(mode="json"))
    return [line for line in differences if not line.startswith(RESUMABLE_ELSEWHERE)]


def prepare(config: StrictModel, run_dir: Path, write: bool = True) -> None:
    """Create a run directory with its config, or check that an existing one holds the same config (to resume).
    With `write` False (the other ranks of a torchrun job) only the check is made: rank 0 creates the directory."""
    run_dir = Path(run_dir)
    differences = differences_from_saved(run_dir, config)
    if differences:
        raise CheckpointError(
            f"{run_dir} already holds a run with a different config ({'; '.join(differences)}); "
            "choose another --out directory, or rerun with the original settings to resume"
        )
    if differences is not None or not write:
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a run directory; choose an empty or new --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RUN_CONFIG, lambda tmp: save_yaml(config, tmp))


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    """Finish a run: its metrics as `metrics.json` (written atomically)."""
    write_json_atomic(Path(run_dir) / METRICS_FILE, metrics)


def read_metrics(run_dir: Path) -> dict[str, float]:
    """A finished run's `metrics.json`."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {METRICS_FILE}: not a finished run (train or evaluate it first)")
    return json.loads(path.read_text())


def is_finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run (its config and metrics.json)."""
    return (Path(run_dir) / METRICS_FILE).is_file() and (Path(run_dir) / RUN_CONFIG).is_file()


def is_dictionary_run(run_dir: Path) -> bool:
    """Whether a run directory belongs to `train-dictionary` (its config has a `data` section) rather than SPD."""
    path = Path(run_dir) / RUN_CONFIG
    return path.is_file() and "data" in (load_yaml(path) or {})


def run_name(run_dir: Path) -> str:
    """The name in a run's saved config (the preset's name), or the directory's name."""
    path = Path(run_dir) / RUN_CONFIG
    return str(load_yaml(path).get("name", Path(run_dir).name)) if path.is_file() else Path(run_dir).name
