"""Targets by config: the one a run decomposes (a toy target copied into its run directory, so the directory is
self-contained; a language model loaded from its package cache or directory), and training a preset's target."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from unmerge.config import LanguageTargetConfig, OwnModelConfig, TargetConfig
from unmerge.errors import ConfigError
from unmerge.targets.base import Target
from unmerge.targets.language_data import TRAINING_FILE, language_data, language_target, small_lm_dir
from unmerge.targets.toys import (
    CONFIG_FILE,
    RECIPES,
    build_target,
    cached_target,
    load_target,
    save_target,
    target_cache_dir,
    train_and_save_target,
)
from unmerge.train import distributed

OWN_MODEL_RUN = (
    "this run decomposes a model passed from Python (target.kind: own_model), which only Python holds: load it "
    "with unmerge.Decomposition.load(RUN_DIR, model=...) and train it with unmerge.decompose(model, data, ...)"
)


def run_target(config: TargetConfig | LanguageTargetConfig, target_dir: Path) -> Target:
    """The target a run decomposes: its own copy of a toy target in `target_dir` (copied from the cache on first
    use, by rank 0), or the language model (not copied). A model passed from Python cannot be rebuilt here."""
    if isinstance(config, OwnModelConfig):
        raise ConfigError(OWN_MODEL_RUN)
    if isinstance(config, LanguageTargetConfig):
        return language_target(config)
    if (target_dir / CONFIG_FILE).is_file():
        return load_target(target_dir)[0]
    target = cached_target(config)
    if distributed.is_main_process():
        save_target(target, config, target_dir)
    return target


def untrained_target(config: TargetConfig) -> Target:
    """A toy target built from its recipe but not trained: its shapes, for planning a run."""
    if isinstance(config, OwnModelConfig):
        raise ConfigError(OWN_MODEL_RUN)
    return build_target(config, RECIPES[config.kind].build(config))


def train_preset_target(
    config: TargetConfig | LanguageTargetConfig, out: Path | None, name: str
) -> tuple[Path, float | None]:
    """Train the target of preset `name` into the cache (a toy target into `out` instead, if given); its
    directory and final training loss, or None if it was trained before. An algorithmic toy's task score goes to
    `task_metrics.json` beside it."""
    if isinstance(config, LanguageTargetConfig):
        if config.model.kind != "small_lm" or out is not None:
            raise ConfigError(
                f"{name}: train-target trains toy targets and small LMs (into the cache, no --out); "
                "a pretrained language model is loaded, not trained"
            )
        directory = small_lm_dir(config.model.recipe, config.text)
        trained_before = (directory / TRAINING_FILE).is_file()
        language_data(config.model, config.text)
        summary = json.loads((directory / TRAINING_FILE).read_text())
        return directory, None if trained_before else summary["train_loss"]
    directory = Path(out) if out else target_cache_dir(config)
    with nullcontext() if out else distributed.training_lock(directory):
        if (directory / CONFIG_FILE).is_file():
            return directory, None
        return directory, train_and_save_target(config, directory)[1]
