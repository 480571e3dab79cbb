"""The run directory's lifecycle: claim it (a lock file: one writer at a time), create it with its resolved config,
recognise it again (same config: resume; another config: refuse, naming the differences, unless nothing was
trained yet, or only the learning rate changed), clean up after an interrupted write, and finish it with
`metrics.json`.

A run directory holds `config.yaml` (the resolved config), `target/` (a toy target's trained weights, so the
directory is self-contained), `checkpoints/`, `train_log.jsonl`, `eval_log.jsonl`, `metrics.json`, `figures/`,
`report.html` and, by kind, `dictionary.safetensors`, `ground_truth.safetensors` or `grouping.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from unmerge.config import StrictModel, load_yaml, save_yaml, validate
from unmerge.errors import CheckpointError, warn
from unmerge.io import PARTIAL_MARK, write_atomic, write_json_atomic

RUN_CONFIG = "config.yaml"
METRICS_FILE = "metrics.json"
TARGET_DIR = "target"
FIGURES_DIR = "figures"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
DICTIONARY_FILE = "dictionary.safetensors"  # the trained dictionary with its normalisation folded in
GROUND_TRUTH_FILE = "ground_truth.safetensors"  # a toy source's true features (and hierarchy parents)
GROUPING_FILE = "grouping.json"  # the chosen grouping of a run's subcomponents, with its merge history
CHECKPOINT_DIR = "checkpoints"  # step-NNNNNNN/ folders (`unmerge.train.checkpoint`)
STAGING_PREFIX = ".staging-"  # a checkpoint folder being written (left behind only by a killed process)
LOCK_FILE = ".lock"  # "PID HOST" of the process writing the directory
LOCK_WRITE_SECONDS = 5.0  # a lock file younger than this and still empty is being written, not stale

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
CHANGEABLE_ON_RESUME = ("train.optim.lr:",)  # the fix a non-finite loss asks for; recorded in the training log


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
    saved = load_yaml(path)
    kind, wanted = (_kind("data" in fields) for fields in (saved, config_cls.model_fields))
    if kind != wanted:
        raise CheckpointError(f"{run_dir} holds {kind}, but this needs {wanted}; give another directory")
    return validate(config_cls, config_cls.upgrade_saved(saved), str(path))


def _kind(dictionary: bool) -> str:
    return "a dictionary run (`train-dictionary`)" if dictionary else "an SPD run (`decompose`)"


def differences_from_saved(run_dir: Path, config: StrictModel) -> list[str] | None:
    """How `config` differs from the one saved in `run_dir` (empty: the same run), or None if none is saved."""
    if not (Path(run_dir) / RUN_CONFIG).is_file():
        return None
    previous = saved_config(run_dir, type(config))
    differences = config_differences(previous.model_dump(mode="json"), config.model_dump(mode="json"))
    return [line for line in differences if not line.startswith(RESUMABLE_ELSEWHERE)]


def saved_steps(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders `step-NNNNNNN`, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")) if root.is_dir() else []


def has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds anything trained: a checkpoint, or a finished run's metrics."""
    return bool(saved_steps(run_dir)) or (Path(run_dir) / METRICS_FILE).is_file()


def check_out_dir(run_dir: Path) -> None:
    """`--out` must be a directory we can create or write: not a file, not under a file, not read-only."""
    for path in [run_dir, *run_dir.parents]:
        if not path.exists():
            continue
        if not path.is_dir():
            where = "is a file" if path == run_dir else f"lies under {path}, which is a file"
            raise CheckpointError(f"{run_dir} {where}; a run needs a directory path (--out)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CheckpointError(f"{run_dir}: {path} is not writable; choose a directory you can write to")
        return


def clean_interrupted_writes(run_dir: Path) -> None:
    """Remove what a killed process left half-written: checkpoint staging folders and atomic writes' temp files."""
    for staging in (Path(run_dir) / CHECKPOINT_DIR).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(staging, ignore_errors=True)
    for partial in Path(run_dir).rglob(f".*{PARTIAL_MARK}*"):
        if partial.is_file():
            partial.unlink()


def _lock_holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file, or None if it is unreadable."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # Linux: the state letter follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _take_lock(run_dir: Path) -> bool:
    """Write our lock file into `run_dir`; False if this process holds it already. A live holder is an error
    naming it; a dead one's (or an unreadable) lock is taken over with a warning."""
    lock, me = run_dir / LOCK_FILE, (os.getpid(), socket.gethostname())
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _lock_holder(lock)
        if holder == me:
            return False
        if holder is None and _age_seconds(lock) < LOCK_WRITE_SECONDS:  # being written by its creator right now
            raise CheckpointError(f"{run_dir} is being claimed by another process; try again") from None
        if holder is not None and (holder[1] != me[1] or _alive(holder[0])):
            raise CheckpointError(
                f"{run_dir} is being written by process {holder[0]} on {holder[1]}; wait for it to finish or stop "
                f"it, or choose another --out directory (if no such process runs, delete {lock})"
            ) from None
        warn(f"{run_dir}: took over the lock of process {holder[0] if holder else '?'}, which no longer runs")
        write_atomic(lock, lambda tmp: tmp.write_text(f"{me[0]} {me[1]}"))
        if _lock_holder(lock) != me:
            raise CheckpointError(f"{run_dir} was claimed by another process at the same moment; try again") from None
        return True
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{me[0]} {me[1]}")
    return True


@contextmanager
def locked(run_dir: Path, write: bool = True) -> Iterator[None]:
    """While active, this process is the one writing `run_dir` (a lock file; a second writer is refused at once,
    a stale lock taken over), and what an interrupted writer left half-written is cleaned. Re-entrant; with
    `write` False (the other ranks of a torchrun job) it does nothing."""
    run_dir = Path(run_dir)
    if not write:
        yield
        return
    check_out_dir(run_dir)
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    taken = _take_lock(run_dir)
    try:
        if taken:
            clean_interrupted_writes(run_dir)
        yield
    finally:
        if taken:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            if not existed and not any(run_dir.iterdir()):
                run_dir.rmdir()  # a command that failed before writing anything leaves no trace


@contextmanager
def opened(config: StrictModel, run_dir: Path, write: bool = True) -> Iterator[None]:
    """`locked`, with `run_dir` prepared for `config` (`prepare`): the run trains and finishes inside."""
    with locked(run_dir, write):
        prepare(config, run_dir, write)
        yield


@contextmanager
def saving(config: StrictModel, run_dir: Path) -> Iterator[None]:
    """`locked`, with `config` written into `run_dir` for a finished run to be saved there (from Python: a
    decomposition or dictionary trained in memory); refused unless the directory is empty or holds this run."""
    with locked(run_dir):
        differences = differences_from_saved(run_dir, config)
        if differences or (differences is None and any(p.name != LOCK_FILE for p in run_dir.iterdir())):
            raise CheckpointError(f"{run_dir} holds other files or another run; save into an empty directory")
        write_atomic(run_dir / RUN_CONFIG, lambda tmp: save_yaml(config, tmp))
        yield


def prepare(config: StrictModel, run_dir: Path, write: bool = True) -> None:
    """Create a run directory with its config, or check that an existing one holds the same config (to resume).
    A directory with nothing trained yet (a run that failed before its first checkpoint) takes a corrected config
    and starts afresh; a trained one takes a changed learning rate (recorded in its training log) and refuses any
    other change. With `write` False (the other ranks of a torchrun job) only the check is made."""
    run_dir = Path(run_dir)
    differences = differences_from_saved(run_dir, config)
    if differences and not has_progress(run_dir):
        if write:
            _start_afresh(run_dir)
        differences = None
    blocking = [line for line in differences or [] if not line.startswith(CHANGEABLE_ON_RESUME)]
    if blocking:
        raise CheckpointError(
            f"{run_dir} already holds a run with a different config ({'; '.join(blocking)}); "
            "choose another --out directory, or rerun with the original settings to resume"
        )
    if not write or differences == []:  # the same run: it resumes as it is
        return
    if differences:
        _record_change(run_dir, differences)
    elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a run directory; choose an empty or new --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RUN_CONFIG, lambda tmp: save_yaml(config, tmp))


def _start_afresh(run_dir: Path) -> None:
    """Clear a run directory that holds nothing trained for a new config: its config, copied target, logs and
    figures (anything else in it is left, and then makes it not a run directory)."""
    for name in (RUN_CONFIG, TRAIN_LOG, EVAL_LOG):
        (run_dir / name).unlink(missing_ok=True)
    for name in (TARGET_DIR, FIGURES_DIR, CHECKPOINT_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _record_change(run_dir: Path, differences: list[str]) -> None:
    """A resume with a changed learning rate: one line in the training log at the step it resumes from."""
    steps = saved_steps(run_dir)
    step = int(steps[-1].name.removeprefix("step-")) if steps else 0
    log = run_dir / TRAIN_LOG
    torn = log.is_file() and not log.read_bytes().endswith(b"\n") and log.stat().st_size > 0
    with log.open("a") as handle:
        handle.write(("\n" if torn else "") + json.dumps({"step": step, "config_changed": differences}) + "\n")
    warn(f"{run_dir}: resuming from step {step} with {'; '.join(differences)} (recorded in {TRAIN_LOG})")


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    """Finish a run: its metrics as `metrics.json` (written atomically)."""
    write_json_atomic(Path(run_dir) / METRICS_FILE, metrics)


def read_metrics(run_dir: Path) -> dict[str, float]:
    """A finished run's `metrics.json`."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {METRICS_FILE}: not a finished run (train or evaluate it first)")
    fix = f"rerun `unmerge evaluate {run_dir}` to rewrite it"
    metrics = read_json_object(path, fix)
    wrong = [key for key, value in metrics.items() if not isinstance(value, (int, float, type(None)))]
    if wrong:
        raise CheckpointError(f"{path}: {wrong[0]!r} is not a number; {fix}")
    return metrics


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in one of a run's files; a file that is not UTF-8 JSON holding an object is an error
    naming it and ending with `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


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
