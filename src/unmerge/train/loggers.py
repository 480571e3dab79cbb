"""Scalar loggers for watching long runs remotely: TensorBoard and Weights & Biases receive the same scalars the
loop appends to `train_log.jsonl` and `eval_log.jsonl` (as `train/<name>` and `eval/<name>`), from rank 0 only.

Both are optional dependencies, imported only when a run asks for them; wandb runs offline (files under the run
directory, synced later with `wandb sync`) unless `WANDB_MODE` says otherwise.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unmerge.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


def _require(name: str) -> Any:
    """Import an optional logger's package (named as the logger), or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"train.loggers asks for {name}, which is not installed; `pip install {name}` "
            f"(or drop {name} from train.loggers)"
        ) from None


class _TensorBoard:
    def __init__(self, run_dir: Path, description: str) -> None:
        _require("tensorboard")
        summary = importlib.import_module("torch.utils.tensorboard")
        self.writer = summary.SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, description: str) -> None:
        wandb = _require("wandb")
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(dir=str(run_dir), name=description, mode=mode, reinit=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_LOGGERS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class ScalarLoggers:
    """The loggers of one run; `run_dir` None (another rank, or no run directory) logs nothing."""

    def __init__(self, run_dir: Path | None, names: Sequence[str], description: str) -> None:
        self._loggers = [] if run_dir is None else [_LOGGERS[name](Path(run_dir), description) for name in names]

    def log(self, kind: str, step: int, scalars: dict[str, float]) -> None:
        """Send `scalars` as `kind/name` (kind: train or eval) at `step`."""
        for logger in self._loggers:
            logger.log(step, {f"{kind}/{name}": value for name, value in scalars.items()})

    def close(self) -> None:
        for logger in self._loggers:
            logger.close()
        self._loggers = []
